"""The teacher's tokenizer, which students use too, so both sides see the same tokens; and the id
translation for a teacher whose vocabulary is the student's under other ids."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kdserve.packaged import resolve_hf_path

# Special tokens matched by role, not by string: BERT's [CLS]/[SEP]/[PAD] are MPNet's <s>/</s>/<pad>.
ROLES = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")
# Texts every translation is checked on besides the data's own: casing, accents, punctuation, digits,
# words split into pieces, scripts and symbols a vocabulary may lack.
PROBES = ("A dog, running.", "Déjà vu: naïve CAFÉ résumé!", "unaffable anti-disestablishmentarianism 1984's",
          "x² ≈ 3.14159 — 10% off (e.g. #42) @home", "東京 and 北京", "emoji 🙂 here", "tab\tand  spaces\n")


def load_tokenizer(name: str = "minilm"):
    """The teacher's tokenizer: 'minilm' (the packaged all-MiniLM-L6-v2), 'mpnet' (all-mpnet-base-v2) or a local HF dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_hf_path(name))


def id_translation(student: Any, teacher: Any, texts: Sequence[str] = ()) -> torch.Tensor:
    """(V_s,) int64: for each student token id, the teacher's id of the same token (the special tokens by
    role). ValueError, naming a token or text, unless every student token has a teacher id and the
    translated encoding of each text in ``PROBES`` and ``texts`` is the teacher's own encoding of it (same
    normalisation, same pieces, same special tokens): only then are token-level targets the student's.
    all-MiniLM-L6-v2 -> all-mpnet-base-v2: BERT uncased's WordPiece vocabulary, shifted by 4 ids."""
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    table = torch.full((max(s_vocab.values()) + 1,), -1, dtype=torch.int64)
    for token, i in s_vocab.items():
        if token in t_vocab:
            table[i] = t_vocab[token]
    for role in ROLES:
        s_tok, t_tok = getattr(student, role, None), getattr(teacher, role, None)
        if s_tok is not None and t_tok is not None:
            table[s_vocab[s_tok]] = t_vocab[t_tok]
    missing = [tok for tok, i in sorted(s_vocab.items(), key=lambda kv: kv[1]) if table[i] < 0]
    if missing:
        raise ValueError(f"{len(missing)} of the student's {len(s_vocab)} tokens are not in the teacher's vocabulary "
                         f"(e.g. {missing[:3]}): its tokens cannot be translated")
    for text in (*PROBES, *texts):
        mine = table[torch.tensor(student(text)["input_ids"], dtype=torch.int64)].tolist()
        theirs = teacher(text)["input_ids"]
        if mine != theirs:
            raise ValueError(f"the teacher's tokenizer splits {text[:40]!r} otherwise ({len(theirs)} tokens against the "
                             f"student's {len(mine)} translated): its tokens are not the student's")
    return table
