"""Generators: the encoder-decoder whose last feature map the zoo's heads and combiners turn into logits.

``"unet"`` is the zoo's own U-Net (:class:`probseg.layers.unet.UNet`, Kohl et al.'s generator).
``"smp"`` is a U-Net with an encoder from segmentation_models_pytorch (Iakubovskii 2019), as the
Dice semimetric loss paper trains (Wang et al., "Dice Semimetric Losses: Optimizing the Dice Score
with Soft Labels", Sec. 3.2: UNet with ResNet50/18 and EfficientNetB0 encoders):
``smp.Unet(encoder_name, encoder_weights=None, in_channels=C)`` without its segmentation head.
Both expose what the networks use: ``forward(x)`` -> the full-resolution features of the last
decoder block (B, out_channels, H, W), ``down`` / ``decode`` (the contracting path's features,
shallow to deep, and the expanding path from them), ``out_channels``, ``bottleneck_channels``
(channels of the deepest features) and ``downsampling`` (H and W must be divisible by it).

segmentation_models_pytorch is an optional extra (``pip install 'probseg[smp]'``), imported only
when an ``"smp"`` generator is built. Its encoders start from random weights: nothing is
downloaded. ``encoder_weights`` may name a local file holding an encoder state dict (e.g.
ImageNet weights saved on a machine with internet), read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from probseg.layers.unet import UNet, check_image

GENERATORS = ("unet", "smp")
"""Names of the generators (the ``generator`` option of the U-Net-based zoo models)."""

SMP_INSTALL = "pip install 'probseg[smp]'"

SMP_RESERVED = ("in_channels", "classes", "activation", "aux_params")
"""smp.Unet arguments the adapter sets itself (``encoder_weights`` is the local file, see above)."""


def import_smp() -> Any:
    """segmentation_models_pytorch, imported on first use, with an error naming the install command.

    Raises:
        ImportError: it is not installed, or it (or the torchvision it needs) fails to import.
    """
    try:
        import segmentation_models_pytorch as smp
    except ModuleNotFoundError as err:
        raise ImportError(f"generator='smp' needs segmentation-models-pytorch, which is not installed ({err}); "
                          f"install the optional extra: {SMP_INSTALL}") from None
    except Exception as err:  # noqa: BLE001 (e.g. a torchvision built for another torch fails with RuntimeError)
        raise ImportError(f"segmentation-models-pytorch is installed but failed to import ({type(err).__name__}: "
                          f"{err}); it needs a torchvision built for the installed torch {torch.__version__}") from err
    return smp


class SMPUNet(nn.Module):
    """segmentation_models_pytorch's U-Net without its segmentation head, as a zoo generator.

    Args:
        in_channels: image channels C.
        encoder_name: an smp encoder, e.g. ``"resnet18"``, ``"resnet50"``, ``"efficientnet-b0"``.
        encoder_depth: encoder stages (3 to 5); the decoder has as many blocks.
        decoder_channels: channels of the decoder blocks, deep to shallow (one per stage); the
            last is the feature width the heads and combiners see.
        encoder_weights: path of a local file holding the encoder's state dict (None: random
            initialization); see :func:`load_encoder_weights`.
        **smp_options: further ``smp.Unet`` arguments (e.g. ``decoder_attention_type="scse"``).

    Shape:
        (B, C, H, W) -> (B, decoder_channels[-1], H, W); H and W divisible by ``2 ** encoder_depth``.
    """

    def __init__(self, in_channels: int, encoder_name: str, encoder_depth: int = 5,
                 decoder_channels: list[int] = (256, 128, 64, 32, 16), encoder_weights: str | None = None,
                 **smp_options: Any) -> None:
        super().__init__()
        decoder_channels = list(decoder_channels)
        reserved = sorted(set(smp_options) & set(SMP_RESERVED))
        if reserved:
            raise ValueError(f"generator_options may not set {reserved}: the smp generator sets them itself")
        if len(decoder_channels) != encoder_depth:
            raise ValueError(f"decoder_channels needs one entry per encoder stage ({encoder_depth}), "
                             f"got {decoder_channels}")
        smp = import_smp()
        # classes is required by smp; its segmentation head is dropped below (the zoo brings its own).
        model = smp.Unet(encoder_name=encoder_name, encoder_depth=encoder_depth, encoder_weights=None,
                         decoder_channels=decoder_channels, in_channels=in_channels, classes=1, **smp_options)
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.in_channels = in_channels
        self.out_channels = decoder_channels[-1]
        self.bottleneck_channels = int(self.encoder.out_channels[-1])
        self.downsampling = 2 ** encoder_depth
        if encoder_weights is not None:
            load_encoder_weights(self.encoder, encoder_weights, in_channels)

    def down(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features, shallow to deep (the first is the input itself, as smp gives it)."""
        return self.encoder(x)

    def decode(self, skips: list[torch.Tensor],
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder on the encoder's features (``self.down(x)``).

        Args:
            skips: features per stage, shallow to deep, as returned by ``self.down``.
            transform: optional map applied to the input of every decoder block's first
                convolution (the upsampled deeper features concatenated with the skip), e.g.
                MC dropout, as :meth:`probseg.layers.unet.UNet.decode` applies it. With
                ``decoder_attention_type`` set, smp applies its ``attention1`` to the
                concatenation before that convolution, so the transform acts on the attended
                features (after the attention, not before it).
        """
        if transform is None:
            return self.decoder(list(skips))
        # smp's blocks concatenate inside forward: the transform goes in front of each conv1.
        hooks = [block.conv1.register_forward_pre_hook(lambda _, args: (transform(args[0]), *args[1:]))
                 for block in self.decoder.blocks]
        try:
            return self.decoder(list(skips))
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels, self.downsampling)
        return self.decode(self.down(x))


def adapt_input_convolution(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first convolution's (O, C', k, k) weights for C = ``in_channels`` input channels: summed
    over the C' channels for C = 1 (a grey image as C' equal channels), else the C' channels
    repeated cyclically (channel c takes c' = c mod C') and scaled by C' / C.

    The response to an image whose C channels are all equal stays the same for C = 1 and when C
    is a multiple of C' (each of the C' channels is then repeated C / C' times). Otherwise it
    changes: channel c' is repeated floor or ceil of C / C' times, so e.g. C = 2 from C' = 3
    gives (3 / 2)(W_0 + W_1) in place of W_0 + W_1 + W_2."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike, in_channels: int) -> None:
    """Load a local encoder state dict into an smp encoder.

    The file holds the encoder's state dict, e.g. ``smp.encoders.get_encoder(name).state_dict()``
    or a torchvision classifier's (smp's encoders drop the classifier's keys). The first
    convolution (the first 4-D entry of the encoder's state dict) saved for another number of
    input channels (ImageNet's 3 for a grey model) is adapted by :func:`adapt_input_convolution`;
    any other shape that differs is refused.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is no state dict, or its keys or shapes do not fit the encoder (the
            error names the file and the missing, unexpected and mismatched keys).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generator_options.encoder_weights: no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (pickle and zip errors differ by what the file holds)
        raise ValueError(f"{path}: cannot be read as a state dict with torch.load(weights_only=True): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = " (a Lightning checkpoint? save its encoder's state_dict instead)" if isinstance(state, dict) \
            and "state_dict" in state else ""
        raise ValueError(f"{path}: expected a state dict (names -> tensors) of the encoder{hint}")
    own = encoder.state_dict()
    first_conv = next((k for k, v in own.items() if v.ndim == 4), None)  # the encoder's input convolution
    state = dict(state)
    mismatched = []
    for key, value in list(state.items()):
        if key not in own or value.shape == own[key].shape:
            continue
        other_channels = value.ndim == 4 and value.shape[:1] + value.shape[2:] == own[key].shape[:1] + own[key].shape[2:]
        if key == first_conv and other_channels and own[key].shape[1] == in_channels:  # saved for other inputs
            state[key] = adapt_input_convolution(value, in_channels)
        else:
            mismatched.append(f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}")
    if mismatched:
        raise ValueError(f"{path}: shapes do not fit the encoder: " + "; ".join(mismatched))
    # smp's encoders drop a classifier's keys from the dict they are given (and return nothing),
    # so what did not fit is read off the dict afterwards.
    encoder.load_state_dict(state, strict=False)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: the state dict does not fit the encoder {type(encoder).__name__}: "
                         f"missing keys {missing}, unexpected keys {unexpected}"
                         + (" (the file holds a whole model: save model.encoder.state_dict())"
                            if any(k.startswith("encoder.") for k in unexpected) else ""))


def build_generator(in_channels: int, num_filters: list[int], convs_per_block: int, generator: str = "unet",
                    options: dict[str, Any] | None = None) -> nn.Module:
    """The generator of a U-Net-based zoo network.

    Args:
        in_channels: image channels C.
        num_filters, convs_per_block: the zoo U-Net's channels per level and convolutions per
            block (``"unet"`` only; an ``"smp"`` generator's widths come from its encoder and
            ``decoder_channels``).
        generator: one of :data:`GENERATORS`.
        options: ``"smp"``: the arguments of :class:`SMPUNet` after ``in_channels``
            (``encoder_name`` required); ``"unet"``: none.

    Returns:
        A module with ``forward``, ``down``, ``decode``, ``out_channels``, ``bottleneck_channels``
        and ``downsampling`` (see the module docstring).
    """
    options = dict(options or {})
    options.pop("initialized_from", None)  # a record only (see without_weights_file)
    if generator == "unet":
        if options:
            raise ValueError(f"generator_options {sorted(options)} apply to generator='smp'; the zoo U-Net takes "
                             "num_filters and convs_per_block")
        return UNet(in_channels, list(num_filters), convs_per_block)
    if generator == "smp":
        if "encoder_name" not in options:
            raise ValueError("generator='smp' needs generator_options.encoder_name, e.g. 'resnet18', 'resnet50' or "
                             "'efficientnet-b0'")
        return SMPUNet(in_channels, **options)
    raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")


def without_weights_file(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Generator options as a checkpoint saves them: the weights file only initializes the
    encoder (its weights are in the state dict from then on), so a reload must not need it; its
    path is kept as ``initialized_from`` for the record."""
    if not options or options.get("encoder_weights") is None:
        return options
    options = dict(options)
    options["initialized_from"] = os.fspath(options.pop("encoder_weights"))
    return options
