"""Coordinate-regression networks for KD-Loss: encoder -> global average pool -> dropout -> dense.

`LandmarkRegressor.__call__(images [B, S, S, 3], train) -> [B, L, 2]`: landmark coordinates
normalised to the crop, u = (p + 0.5) / S for crop pixel p (so the crop's pixel edges are 0
and 1; see `fan_jax.landmarks`). The dense layer emits (x0, y0, x1, y1, ...) like the public
code's 2L vector. Parameters live under 'encoder' and 'head'.

Student: MobileNetV2 (width 1.0) with its full stack, i.e. `MobileNetV2Encoder` plus Keras's
`Conv_1` (1x1 to 1280) + `Conv_1_bn` + ReLU6; head dropout 0.1 (the authors' MobileNetV2
regressors use 0.1 or 0.5, or none; configurable). Teachers: EfficientNet-B3 to
`top_activation`, head dropout 0.5 (public cnn_model.create_efficientNet). Input 224x224.

Encoder submodules keep Keras layer names, so `fan_jax.pretrained.keras_to_variables` (and
`fan_jax.pretrained_efficientnet`) fill them from Keras ImageNet models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax.models.efficientnet import KERAS_IMAGENET_INPUT_SCALE, EfficientNetEncoder
from fan_jax.models.layers import PointwiseConv
from fan_jax.models.mobilenet_v2 import MobileNetV2Encoder, make_divisible

Array = jax.Array


class MobileNetV2Full(MobileNetV2Encoder):
    """MobileNetV2 to Keras's `out_relu`: the encoder + 1x1 conv to 1280 + BN + ReLU6.

    (1280 * width channels for width > 1, as Keras.)
    """

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = super().__call__(x, train)
        last = make_divisible(1280 * self.width, 8) if self.width > 1.0 else 1280
        x = PointwiseConv(last, name="Conv_1")(x)
        return nn.relu6(self._bn("Conv_1_bn", train)(x))


HEAD_POOLS = ("avg", "flatten")


class RegressionHead(nn.Module):
    """Pooling -> dropout -> dense to 2L, reshaped to [B, L, 2].

    pool 'avg' (the public code: global average pooling) or 'flatten' (every cell of the
    final feature map feeds the dense layer, so where a feature fires is an input of the
    regression instead of something the convs must learn to encode in their channels).
    """

    num_landmarks: int
    dropout_rate: float = 0.5
    # The output bias starts at the crop centre, so early steps learn shape, not offset.
    bias_init_value: float = 0.5
    pool: str = "avg"

    @nn.compact
    def __call__(self, features: Array, train: bool = False) -> Array:
        if self.pool not in HEAD_POOLS:
            raise ValueError(f"head pool must be one of {HEAD_POOLS}, got {self.pool!r}")
        if self.pool == "avg":
            x = jnp.mean(features, axis=(1, 2))
        else:
            x = features.reshape(features.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            2 * self.num_landmarks,
            name="out",
            # Thousands of flattened inputs would start the outputs far outside the crop
            # (an MSE of about 2 in crop units): start at the centre and learn from there.
            kernel_init=(
                nn.initializers.zeros if self.pool == "flatten" else nn.initializers.lecun_normal()
            ),
            bias_init=nn.initializers.constant(self.bias_init_value),
        )(x)
        return x.reshape(x.shape[0], self.num_landmarks, 2)


class SoftArgmaxHead(nn.Module):
    """A heatmap network's readout as coordinates: soft-argmax (integral regression).

    Heatmaps [B, H, W, L] (or a FAN's (heatmaps, taps)) -> u coordinates [B, L, 2]: softmax
    of beta * heatmap over the pixels, then the expected pixel centre, u = (j + 0.5) / W
    (a heatmap pixel j at stride S / W is crop pixel (j + 0.5) S / W - 0.5). beta is learnt
    (as log beta); at its start, 20, a trained FAN's peak of ~0.8 outweighs 4096 background
    pixels by e^8, so the readout starts near the argmax."""

    beta_init: float = 20.0

    @nn.compact
    def __call__(self, features: Array | tuple, train: bool = False) -> Array:
        hm = features[0] if isinstance(features, tuple) else features
        b, h, w, n = hm.shape
        log_beta = self.param(
            "log_beta", nn.initializers.constant(jnp.log(self.beta_init)), (), jnp.float32
        )
        p = jax.nn.softmax(jnp.exp(log_beta) * hm.reshape(b, h * w, n).astype(jnp.float32), 1)
        p = p.reshape(b, h, w, n)
        x = jnp.einsum("bhwl,w->bl", p, (jnp.arange(w, dtype=jnp.float32) + 0.5) / w)
        y = jnp.einsum("bhwl,h->bl", p, (jnp.arange(h, dtype=jnp.float32) + 0.5) / h)
        return jnp.stack([x, y], -1)


class LandmarkRegressor(nn.Module):
    """Encoder + regression head; `__call__(images, train) -> [B, L, 2]` normalised coordinates."""

    encoder: nn.Module
    head: nn.Module

    def __call__(self, images: Array, train: bool = False) -> Array:
        return self.head(self.encoder(images, train=train), train=train)


def mobilenet_v2_regressor(
    num_landmarks: int,
    width: float = 1.0,
    dropout_rate: float = 0.1,
    bn_momentum: float = 0.9,
    pool: str = "avg",
) -> LandmarkRegressor:
    """The KD-Loss student: full MobileNetV2 + GAP + dropout + dense(2L)."""
    return LandmarkRegressor(
        encoder=MobileNetV2Full(width=width, bn_momentum=bn_momentum),
        head=RegressionHead(num_landmarks, dropout_rate, pool=pool),
    )


def efficientnet_b3_regressor(
    num_landmarks: int,
    dropout_rate: float = 0.5,
    keras_imagenet_input: bool = True,
    drop_connect_rate: float = 0.2,
    bn_momentum: float = 0.99,
    pool: str = "avg",
) -> LandmarkRegressor:
    """A KD-Loss teacher (Tough or Tolerant): EfficientNet-B3 + GAP + dropout 0.5 + dense(2L).

    `keras_imagenet_input` scales the normalised input as Keras's `weights='imagenet'`
    EfficientNet does, so ImageNet-initialised weights see their training distribution.
    """
    scale = KERAS_IMAGENET_INPUT_SCALE if keras_imagenet_input else None
    return LandmarkRegressor(
        encoder=EfficientNetEncoder(
            "b3", drop_connect_rate=drop_connect_rate, input_scale=scale, bn_momentum=bn_momentum
        ),
        head=RegressionHead(num_landmarks, dropout_rate, pool=pool),
    )


def efficientnet_b0_regressor(
    num_landmarks: int, dropout_rate: float = 0.5, pool: str = "avg", **kwargs: Any
) -> LandmarkRegressor:
    """A small EfficientNet-B0 teacher (quick runs, demos); same head as B3."""
    scale = KERAS_IMAGENET_INPUT_SCALE if kwargs.pop("keras_imagenet_input", True) else None
    return LandmarkRegressor(
        encoder=EfficientNetEncoder("b0", input_scale=scale, **kwargs),
        head=RegressionHead(num_landmarks, dropout_rate, pool=pool),
    )


def resnet18_regressor(
    num_landmarks: int, dropout_rate: float = 0.5, pool: str = "avg"
) -> LandmarkRegressor:
    """A ResNet-18 teacher (torchvision layout, 11M parameters in the trunk): the demo's
    teachers, whose trunk can start from the heatmap demo's trained ResNet-18 teacher."""
    from fan_jax.models.resnet import ResNetEncoder

    return LandmarkRegressor(
        encoder=ResNetEncoder(depth=18), head=RegressionHead(num_landmarks, dropout_rate, pool=pool)
    )


def resnet18_fan_softargmax(num_landmarks: int, **unused: Any) -> LandmarkRegressor:
    """A ResNet-18 heatmap FAN read out by soft-argmax: a coordinate regressor whose whole
    network (trunk, deconvolutions, heatmap head) can start from the heatmap demo's trained
    teacher (`model.init_from`), so it regresses at that teacher's accuracy from its first
    step. Its 'encoder' is the FAN; dropout and pooling do not apply (ignored)."""
    from fan_jax.models.fan import resnet18_fan

    return LandmarkRegressor(encoder=resnet18_fan(num_landmarks), head=SoftArgmaxHead())


REGRESSORS: dict[str, Callable[..., LandmarkRegressor]] = {
    "mobilenet_v2_reg": mobilenet_v2_regressor,
    "efficientnet_b3_reg": efficientnet_b3_regressor,
    "efficientnet_b0_reg": efficientnet_b0_regressor,
    "resnet18_reg": resnet18_regressor,
    "resnet18_fan_softargmax": resnet18_fan_softargmax,
}


def config_kwargs(model_config: Any) -> dict:
    """Constructor overrides from a config's model section (negative dropout = the default)."""
    kw: dict[str, Any] = {}
    rate = model_config.get("dropout_rate", -1.0)
    if rate is not None and rate >= 0:
        kw["dropout_rate"] = float(rate)
    pool = model_config.get("head_pool", "avg")
    if pool != "avg":
        kw["pool"] = str(pool)
    return kw


def build_regressor(name: str, num_landmarks: int, **kwargs: Any) -> LandmarkRegressor:
    """Registry: 'mobilenet_v2_reg' (student), 'efficientnet_b3_reg' (teacher),
    'efficientnet_b0_reg' (small teacher), 'resnet18_reg', 'resnet18_fan_softargmax' (the
    demo's teachers)."""
    if name not in REGRESSORS:
        raise ValueError(f"unknown regression model {name!r}; expected one of {sorted(REGRESSORS)}")
    return REGRESSORS[name](num_landmarks, **kwargs)


def keras_encoder_arch(model: LandmarkRegressor) -> str:
    """'mobilenet_v2' or 'efficientnet' (which Keras network initialises the encoder)."""
    if isinstance(model.encoder, MobileNetV2Encoder):
        return "mobilenet_v2"
    if isinstance(model.encoder, EfficientNetEncoder):
        return "efficientnet"
    raise ValueError(f"no Keras weights for encoder {type(model.encoder).__name__}")


def init_encoder_from_keras(model: LandmarkRegressor, variables: Any, source: Any) -> dict:
    """Loads Keras ImageNet weights (model or file) into the regressor's encoder."""
    from fan_jax import pretrained

    if keras_encoder_arch(model) == "efficientnet":
        from fan_jax import pretrained_efficientnet

        return pretrained_efficientnet.init_encoder_from_keras(model, variables, source)
    enc = model.encoder
    keras_model = source
    if not hasattr(source, "layers"):
        import keras

        from fan_jax.pretrained_efficientnet import _legacy_h5_has_classifier

        path = str(source)
        top = (
            path.endswith(".h5")
            and not path.endswith(".weights.h5")
            and _legacy_h5_has_classifier(path)
        )
        keras_model = keras.applications.MobileNetV2(
            weights=None, include_top=top, input_shape=(224, 224, 3), alpha=enc.width
        )
        keras_model.load_weights(path)
    enc_vars = pretrained.keras_to_variables(
        keras_model, enc, bn_epsilon=enc.bn_epsilon, what=f"MobileNetV2Full(width={enc.width})"
    )
    return pretrained.merge_encoder_variables(variables, enc_vars, name="encoder")
