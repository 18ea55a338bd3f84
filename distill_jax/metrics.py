"""Metric logging: TensorBoard event files (tensorboardX, no TensorFlow) and MFU peaks."""

from __future__ import annotations

from pathlib import Path

# Dense bf16 peak TFLOP/s per JAX device, for model-FLOPs utilisation.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """The device's dense bf16 peak, or None when unknown (MFU is then not reported)."""
    if device_kind in PEAK_TFLOPS:
        return PEAK_TFLOPS[device_kind]
    matches = [v for k, v in PEAK_TFLOPS.items() if device_kind.startswith(k)]
    return matches[0] if matches else None


class MetricWriter:
    """Scalars as TensorBoard event files under ``workdir/tensorboard``."""

    def __init__(self, workdir: str | Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
