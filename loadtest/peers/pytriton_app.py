"""PyTriton serving the artifact: ``python loadtest/peers/pytriton_app.py --model-dir models/banking77 --port P``.

A real Triton Inference Server (its HTTP front end and dynamic batcher, up to 64 per batch) in front of one Python
callable; the Open Inference Protocol on ``--port``: input TEXT (BYTES, [n, 1]), output PROBABILITIES.
"""

import argparse
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # contract.py, from the project
import contract  # noqa: E402


# Triton's Python backend stub links libpython3.x.so by name: without this it can pick a system libpython of
# another patch release than this interpreter's standard library (seen: Debian's 3.11.2 under a 3.11.7 venv,
# failing in multiprocessing.resource_tracker). Triton's processes inherit the variable.
os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                              os.environ.get("LD_LIBRARY_PATH")]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    artifact = contract.check(contract.version_folder(args.model_dir), intra_op_threads=1)
    pad_id, names = artifact.manifest.pad_id, artifact.manifest.input_names

    @batch
    def infer(TEXT):  # noqa: N803 (the tensor's name)
        ids, _ = artifact.encoder.encode([row[0].decode() for row in TEXT])
        feed = contract.inputs(ids, pad_id, names)
        return {"PROBABILITIES": artifact.session.run([contract.PROBABILITIES], feed)[0]}

    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                          grpc_port=args.port + 1, metrics_address="127.0.0.1", metrics_port=args.port + 2, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name=artifact.name, infer_func=infer,
                    inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="PROBABILITIES", dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher()))
        triton.serve()


if __name__ == "__main__":
    main()
