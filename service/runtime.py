"""The model in process: the onnxruntime session of one checked artifact (CUDA or CPU), one padded batch per run."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import contract
from contract import ArtifactError

log = logging.getLogger("service.runtime")

CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True, slots=True)
class Scores:
    """One sentence's answer from the model."""

    probabilities: list[float]  # one per class, in label order
    ranked: list[int]  # class indices, most likely first


class Runtime:
    """Runs batches on the artifact's session; ``run`` is called from one worker thread at a time (onnxruntime
    releases the GIL while it computes)."""

    def __init__(self, artifact: contract.Artifact) -> None:
        self.artifact = artifact
        self.session = artifact.session
        self.num_classes = artifact.manifest.num_classes
        self.pad_id = artifact.manifest.pad_id
        self.input_names = artifact.manifest.input_names  # the graph's signature: lengths, or an attention mask
        self.provider = artifact.provider
        self._outputs = [contract.PROBABILITIES]

    def run(self, sequences: list[list[int]]) -> list[Scores]:
        """Each sentence's probabilities and its classes by descending probability.

        The batch is padded only to its own longest sentence; its feed has the tensors the manifest's signature
        names (an encoder's attention mask comes from the same lengths). Ranking and the conversion to lists
        happen here, in the worker thread, once per batch, not once per request on the event loop.
        """
        probabilities = self.session.run(self._outputs, contract.inputs(sequences, self.pad_id,
                                                                     self.input_names))[0]
        if probabilities.shape != (len(sequences), self.num_classes):
            raise RuntimeError(f"model returned shape {probabilities.shape}, expected "
                               f"{(len(sequences), self.num_classes)}")
        ranked = np.argsort(-probabilities, axis=1, kind="stable")
        return list(map(Scores, probabilities.tolist(), ranked.tolist()))

    def close(self) -> None:
        """A retired version: let go of the session and the tokenizer (freed now, unless a run still holds them)."""
        self.session = self.artifact = None

    def warmup(self) -> None:
        """A few batch shapes, so the first requests do not pay for onnxruntime's lazy set-up."""
        unk, longest = self.artifact.manifest.unk_id, self.artifact.manifest.max_length
        for count, length in ((1, 1), (1, longest), (8, 16), (64, 8), (32, longest)):
            self.run([[unk] * length] * count)


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` pip packages (how the GPU image and a pip install
    get them), so a CUDA session finds them without ``LD_LIBRARY_PATH``; system-wide libraries still work."""
    try:
        ort.preload_dlls()
    except Exception as error:  # noqa: BLE001 - a missing package only means the system's libraries are used
        log.info("onnxruntime.preload_dlls: %s", error)


def providers_for(choice: str) -> list[str]:
    available = ort.get_available_providers()
    if choice == "cpu":
        return [contract.CPU]
    if CUDA in available and hasattr(ort, "preload_dlls"):
        _preload_cuda_libraries()
    if choice == "cuda":
        if CUDA not in available:
            raise ArtifactError(f"provider 'cuda' asked for, but this onnxruntime offers only {available} "
                                "(install the gpu extra: onnxruntime-gpu)")
        return [CUDA, contract.CPU]
    return [CUDA, contract.CPU] if CUDA in available else [contract.CPU]


def load_runtime(folder: Path, provider: str = "auto", intra_op_threads: int = 1,
                 inter_op_threads: int = 1) -> Runtime:
    """``contract.check`` the version folder on the chosen provider; raise ``ArtifactError`` on any problem,
    including a CUDA session that onnxruntime silently put on the CPU."""
    wanted = providers_for(provider)
    artifact = contract.check(folder, wanted, intra_op_threads, inter_op_threads)
    got = artifact.provider
    if provider == "cuda" and got != CUDA:
        raise ArtifactError(f"provider 'cuda' asked for, but onnxruntime fell back to {got} (CUDA failed to start)")
    if wanted[0] != got:
        log.warning("wanted %s, onnxruntime gave %s", wanted[0], got)
    log.info("loaded model", extra={"fields": {"model": artifact.name, "version": artifact.version,
                                               "folder": str(folder), "provider": got,
                                               "classes": artifact.manifest.num_classes}})
    return Runtime(artifact)
