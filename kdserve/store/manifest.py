"""A store's manifest: which teacher and target spec its targets come from, written once at creation.

Keys already cover the fingerprint and spec, so a wrong store could never return wrong targets; it
would only miss on every key while filling up with another teacher's targets. The manifest turns
that silent waste into an error at open (``StoreMismatch``), before any teacher time is spent.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from kdserve.store.errors import StoreCorrupt, StoreMismatch

FORMAT_VERSION = 1


def canonical(spec: Any) -> str:
    """The spec as compared and shown: a string as is, anything else as sorted compact JSON."""
    return spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass
class Manifest:
    """``manifest.json`` at the store's root.

    ``spec`` is whatever the caller uses for the target spec (a string such as the ``spec_repr``
    given to ``sample_keys``, or a dict); ``dataset`` is free (name, split, preprocessing) and never
    compared; ``teacher`` (free, never compared) is what a reader needs to know of the teacher without
    contacting it (a job in read mode: its Describe as JSON); ``created`` is set when the store is created.
    """

    fingerprint: str
    spec: Any
    dataset: dict = dataclasses.field(default_factory=dict)
    teacher: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: float = dataclasses.field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
            return cls(fingerprint=d["fingerprint"], spec=d["spec"], dataset=d.get("dataset") or {},
                       teacher=d.get("teacher") or {}, format_version=int(d["format_version"]),
                       created=float(d.get("created", 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorrupt(f"{where}: unreadable manifest ({type(e).__name__}: {e})") from None

    def check(self, wanted: "Manifest", uri: str) -> None:
        """Raise ``StoreMismatch`` (one line naming both values) unless ``wanted`` may use this store."""
        if self.format_version > FORMAT_VERSION:
            raise StoreMismatch(f"store {uri} has format version {self.format_version}; this kdserve reads up to "
                                f"{FORMAT_VERSION}: upgrade kdserve or use another store")
        same_teacher = self.fingerprint == wanted.fingerprint
        same_spec = canonical(self.spec) == canonical(wanted.spec)
        if same_teacher and same_spec:
            return
        what = "teacher" if not same_teacher else "target spec"
        raise StoreMismatch(
            f"store {uri} holds targets of teacher {self.fingerprint} (spec {canonical(self.spec)}); this job's "
            f"teacher is {wanted.fingerprint} (spec {canonical(wanted.spec)}): the {what} differs; use another "
            f"store or this store's teacher and spec")
