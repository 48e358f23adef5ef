"""Real ONNX models that nobody here wrote, taken from the public wheels that ship them.

The wheel is downloaded once with pip (``pip download --no-deps``, nothing installed or
imported) into a cache outside the repository, the ``.onnx`` member is extracted next to
it, and the runtime's own installer (``fetch``, file://) copies it into the test's folder
and verifies its pinned sha256, as an init container does with a model's URI.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from modeldeploy_runtime import fetch

CACHE_ENV = "MODELDEPLOY_WHEEL_CACHE"


@dataclasses.dataclass(frozen=True)
class WheelModel:
    package: str
    version: str
    member: str
    sha256: str

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


YOLOV8N = WheelModel(
    "nudenet",
    "3.4.2",
    "nudenet/320n.onnx",
    "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
)
_OCR = ("rapidocr-onnxruntime", "1.4.4")
OCR_DET = WheelModel(
    *_OCR,
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
)
OCR_REC = WheelModel(
    *_OCR,
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
)
OCR_CLS = WheelModel(
    *_OCR,
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
)
SILERO_VAD = WheelModel(
    "silero-vad",
    "6.2.3",
    "silero_vad/data/silero_vad.onnx",
    "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
)


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "modeldeploy" / "wheels"
    return Path(os.environ.get(CACHE_ENV, default))


def model_file(model: WheelModel, dest: Path) -> Path:
    """The model, fetched and verified into ``dest``; the wheel is downloaded at most once."""
    cache = cache_dir()
    wheel = cache / model.wheel
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", f"{model.package}=={model.version}", "--dest", str(cache)],
            check=True,
            timeout=600,
        )  # fmt: skip
    extracted = cache / "models" / model.package / model.member
    if not extracted.is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(model.member, cache / "models" / model.package)
    return fetch.fetch(extracted.as_uri(), dest, model.sha256, pvc_root=dest)
