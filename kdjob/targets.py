"""A job's target store, on the driver: what a read-mode job knows of its teacher (the store's
manifest), and the store checked against the job's teacher and spec before any cluster starts."""
from __future__ import annotations

from kdserve.errors import one_line


def store_info(cfg, section=None, where: str = "teacher"):
    """The teacher's Describe as the store's manifest keeps it; ConfigError (one line naming
    ``<where>.store``) when there is no store or it does not describe its teacher. ``section``: the
    teacher whose store it is (default ``teacher:``), ``where`` its config path."""
    from kdserve.config import ConfigError
    from kdserve.store import StoreError
    from student_workers.train.store import info_from_manifest, read_manifest

    t = section or cfg.teacher
    try:
        return info_from_manifest(read_manifest(cfg, t), t.store)
    except (StoreError, OSError, ValueError) as e:
        raise ConfigError(f"{where}.store: {one_line(e)}") from None


def check_store(cfg, info, spec, section=None, where: str = "teacher") -> None:
    """``StoreMismatch`` as a ConfigError when ``teacher.store`` exists and holds another teacher's or
    spec's targets. Without a fingerprint (the embedded teacher before it is loaded) only the spec
    is compared; the workers compare both when they open the store."""
    from kdserve.config import ConfigError
    from kdserve.store import StoreError, StoreMissing, spec_repr
    from kdserve.store.manifest import Manifest
    from student_workers.train.store import read_manifest

    t = section or cfg.teacher
    if t.store is None:
        return
    try:
        stored = read_manifest(cfg, t)
    except StoreMissing:
        return  # read_through / write create it
    except (StoreError, OSError, ValueError) as e:
        raise ConfigError(f"{where}.store: {one_line(e)}") from None
    wanted = Manifest(info.fingerprint or stored.fingerprint, spec_repr(spec))
    try:
        stored.check(wanted, t.store)
    except StoreError as e:
        raise ConfigError(f"{where}.store: {one_line(e)}") from None


def check_views(cfg) -> None:
    """A read-mode job on augmented images trains on its store's views: ConfigError (one line naming
    ``teacher.store`` and ``view.params``) when the store lacks any sample's view params."""
    from kdserve.config import ConfigError
    from kdserve.store import StoreError, TargetStore
    from student_workers.train.batches import replays_views
    from student_workers.train.stored_views import check_views as check

    if not (cfg.teacher.reads_store_only and replays_views(cfg)):
        return
    try:
        check(TargetStore.open(cfg.teacher.store, "read", storage_options=cfg.teacher.store_options or None),
              cfg.data.dataset)
    except (StoreError, OSError, ValueError) as e:
        raise ConfigError(f"teacher.store: {one_line(e)}") from None
