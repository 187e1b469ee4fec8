"""LitServe serving the artifact: ``python loadtest/peers/litserve_app.py --model-dir models/banking77 --port P``.

Answers ``POST /classify`` ``{"text": ...}`` with the service's answer shape (top 5 labels). LitServe batches
requests (up to 32, 5 ms timeout) and runs ``predict`` in its own worker process.
"""

import argparse
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # contract.py, from the project
import contract  # noqa: E402


class Classifier(ls.LitAPI):
    def __init__(self, folder: Path) -> None:
        super().__init__(max_batch_size=32, batch_timeout=0.005, api_path="/classify")
        self.folder = folder

    def setup(self, device) -> None:
        self.artifact = contract.check(self.folder, intra_op_threads=1)

    def decode_request(self, request):
        return request["text"]

    def predict(self, texts):
        ids, _ = self.artifact.encoder.encode(list(texts))
        manifest = self.artifact.manifest
        return self.artifact.session.run([contract.PROBABILITIES], contract.inputs(ids, manifest.pad_id,
                                                                                         manifest.input_names))[0]

    def encode_response(self, probabilities):
        labels, ranked = self.artifact.labels, probabilities.argsort()[::-1][:5]
        return {"model": "litserve", "version": self.artifact.version, "predictions": [{
            "label": labels[ranked[0]], "score": float(probabilities[ranked[0]]),
            "probabilities": {labels[i]: float(probabilities[i]) for i in ranked}}]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ls.LitServer(Classifier(contract.version_folder(args.model_dir)), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)
