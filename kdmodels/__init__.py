"""Model definitions both sides of kdserve build (pure torch): the teacher adapters serve them, the students train them."""
from kdmodels.coca import (  # noqa: F401
    CROSS,
    DEFAULT_WEIGHTS,
    MODULES,
    TINY,
    CoCaConfig,
    CoCaModel,
    CoCaOutput,
    build_config,
    caption_loss,
    caption_loss_sparse,
    coca_loss,
    contrastive_loss,
    load_checkpoint,
    save_checkpoint,
    uniform_layers,
)
