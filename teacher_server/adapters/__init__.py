"""Teacher adapters, registered under kind "teacher": timm, timm_cnn, hf, minilm, mpnet, synthetic, coca,
coca_pretrained."""
from teacher_server.adapters import coca, coca_pretrained, hf, synthetic, timm_cnn, timm_vit  # noqa: F401
from teacher_server.adapters.base import Capture, TeacherAdapter  # noqa: F401
