"""SEG's query-blurring processor on every UNet family diffcli runs: SD/SDXL transformer blocks (3-D tokens),
diffcli's own UNet2DModel nets (4-D maps, group norm + residual inside the layer) and DeepFloyd IF's added-KV
joint attention. Tiny models built in code; every reference is computed by hand from the modules' weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pipes import tiny_if_unet

from diffcli.core import attention
from diffcli.shared.errors import DiffcliError
from diffcli.core.denoisers import EDMPrecond
from diffcli.core.guidance import smoothed_energy
from diffcli.backends.nets import UNetF, net_config
from diffcli.core.query_blur import parse_blur

ROLES = ("uncond", "cond", "seg")
INFINITE, GAUSS = parse_blur("gaussian_-1_1e7"), parse_blur("gaussian_3_1.0")


# ---------------------------------------------------------------- tiny UNets of the three families

def own_unet():
    """diffcli's own architecture (UNetF over UNet2DModel): attention at the second level and in the mid block."""
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=4, attention_head_dim=8, num_class_embeds=4)
    return UNetF(cfg).eval()


def sd_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()


def if_unet():
    torch.manual_seed(0)
    return tiny_if_unet(8, False).eval()


def family_call(kind, batch=6, size=(8, 12)):
    """(unet, inputs -> output) for one family, the batch made of `len(ROLES)` chunks with the same conditioning."""
    g = torch.Generator().manual_seed(1)
    c = batch // len(ROLES)
    if kind == "own":
        net = own_unet()
        x = torch.randn(batch, 1, *size, generator=g)
        labels = torch.tensor([2] * c + [0] * c + [0] * c)
        return net.unet, lambda: net(x, torch.full((batch,), 0.3), labels)
    unet = sd_unet() if kind == "sd" else if_unet()
    x = torch.randn(batch, 4 if kind == "sd" else 3, *size, generator=g)
    text = torch.randn(c, 5, 16, generator=g).repeat(len(ROLES), 1, 1)
    return unet, lambda: unet(x, torch.full((batch,), 500.0), encoder_hidden_states=text, return_dict=False)[0]


def run(unet, call, blur, layers=("down", "mid", "up"), latent_hw=(8, 12), recorder=None):
    state = attention.SegState(roles=ROLES, blur=blur, latent_hw=latent_hw)
    paths = attention.resolve_layers(unet, list(layers))
    with attention.installed(unet, state, paths, paths if recorder is not None else (), recorder), torch.no_grad():
        return call()


# ---------------------------------------------------------------- layer discovery

def test_sd_layers_are_the_attn1_layers_as_before():
    unet = sd_unet()
    before = {b: [p for p, m in unet.named_modules() if p.startswith(b) and p.endswith("attn1")
                  and not m.is_cross_attention] for b in ("down", "mid", "up")}
    layers = attention.self_attention_layers(unet)
    assert layers == before
    assert [len(layers[b]) for b in ("down", "mid", "up")] == [2, 1, 4]


def test_own_net_and_if_layer_names():
    own = attention.self_attention_layers(own_unet().unet)
    assert own == {"down": ["down_blocks.1.attentions.0"], "mid": ["mid_block.attentions.0"],
                   "up": ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]}
    deepfloyd = attention.self_attention_layers(if_unet())
    assert deepfloyd == own  # the same block layout, added-KV layers
    unet = if_unet()
    assert attention.resolve_layers(unet, ["u1", "m0"]) == ["up_blocks.0.attentions.1", "mid_block.attentions.0"]
    with pytest.raises(DiffcliError, match=r"^layers 'u2': .*valid: down \(d0\), mid \(m0\), up \(u0-u1\)$"):
        attention.resolve_layers(unet, ["u2"])
    with pytest.raises(DiffcliError, match=r"^--layers 'd1'"):  # a caller may name its own flag
        attention.resolve_layers(own_unet().unet, ["d1"], option="--layers")


def test_a_net_without_attention_is_refused_in_one_line():
    # preset 'tiny' has no Attn*Block2D, but UNet2DModel's mid block attends unless add_attention is off
    assert attention.self_attention_layers(UNetF(net_config("tiny", 8, 1, 0)).unet) == {
        "down": [], "mid": ["mid_block.attentions.0"], "up": []}
    unet = UNetF({**net_config("tiny", 8, 1, 0), "add_attention": False}).unet
    assert attention.self_attention_layers(unet) == {"down": [], "mid": [], "up": []}
    assert attention.resolve_layers(unet, []) == []
    with pytest.raises(DiffcliError, match="no self-attention layers") as e:
        attention.resolve_layers(unet, ["mid"])
    assert "\n" not in str(e.value) and "--" not in str(e.value)


def test_only_cross_attention_if_layers_are_not_self_attention():
    unet = if_unet()
    for m in unet.modules():
        if getattr(m, "added_kv_proj_dim", None) is not None:
            m.only_cross_attention = True
    assert not any(attention.self_attention_layers(unet).values())


# ---------------------------------------------------------------- the processor reproduces the stock one

@pytest.mark.parametrize("kind", ["sd", "own", "if"])
def test_no_blur_is_the_stock_processor(kind):
    unet, call = family_call(kind)
    with torch.no_grad():
        stock = call()
    rows = []
    torch.testing.assert_close(run(unet, call, None, recorder=rows), stock, atol=1e-6, rtol=0)
    layers = sum(len(v) for v in attention.self_attention_layers(unet).values())
    assert len(rows) == layers * len(ROLES) and all(math.isfinite(r["laplacian_var"]) for r in rows)
    assert {r["role"] for r in rows} == set(ROLES) and not any(r["blurred"] for r in rows)
    torch.testing.assert_close(run(unet, call, None), stock, atol=1e-6, rtol=0)  # processors restored after


@pytest.mark.parametrize("kind", ["sd", "own", "if"])
@pytest.mark.parametrize("blur", [INFINITE, GAUSS], ids=["infinite", "gaussian"])
def test_only_the_last_chunk_changes(kind, blur):
    unet, call = family_call(kind)
    plain = run(unet, call, None)
    seg = run(unet, call, blur)
    assert torch.equal(seg[:4], plain[:4])  # uncond and cond chunks bit-identical
    assert (seg[4:] - plain[4:]).abs().max() > 1e-4


# ---------------------------------------------------------------- one layer against hand-written attention

def group_norm(layer, x):
    gn = layer.group_norm
    return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)


def heads(t, n_heads):  # (B, N, C) -> (B, heads, N, C / heads)
    return t.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def hand_attention(layer, x, text=None, q_map=lambda q: q):
    """An attention layer fed (B, C, H, W) maps, by hand: group norm, projections, heads, the query mapped by
    `q_map` ((B, heads, N, d) -> same), softmax(q k^T / sqrt(d)) v, output projection, residual (and IF's
    text keys/values in front of the image's when `text` is given)."""
    b, c, h, w = x.shape
    lin = lambda m, t: t @ m.weight.T + m.bias  # noqa: E731
    tokens = group_norm(layer, x).flatten(2).transpose(1, 2)
    q, k, v = (heads(lin(m, tokens), layer.heads) for m in (layer.to_q, layer.to_k, layer.to_v))
    if text is not None:
        k = torch.cat([heads(lin(layer.add_k_proj, text), layer.heads), k], 2)
        v = torch.cat([heads(lin(layer.add_v_proj, text), layer.heads), v], 2)
    q = q_map(q)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    y = lin(layer.to_out[0], (weights @ v).transpose(1, 2).flatten(2))
    return (y.transpose(1, 2).reshape(b, c, h, w) + x) / layer.rescale_output_factor


def layers_of(kind):
    """One attention layer, its (B, C, H, W) input on a non-square grid and the text (IF) it reads."""
    unet = own_unet().unet if kind == "own" else if_unet()
    layer = unet.get_submodule("mid_block.attentions.0")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, layer.to_q.in_features, 4, 6, generator=g)
    text = torch.randn(6, 5, layer.add_k_proj.in_features, generator=g) if kind == "if" else None
    return layer, x, text


def processor_out(layer, x, text, blur, latent_hw=(6, 4), perturb=True):
    state = attention.SegState(roles=ROLES, blur=blur, latent_hw=latent_hw)
    with torch.no_grad():
        return attention.SegAttnProcessor(state, "mid", perturb)(layer, x, text)


@pytest.mark.parametrize("kind", ["own", "if"])
def test_stock_processor_matches_the_hand_written_layer(kind):
    layer, x, text = layers_of(kind)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, encoder_hidden_states=text), hand_attention(layer, x, text))
        torch.testing.assert_close(processor_out(layer, x, text, None), hand_attention(layer, x, text))


@pytest.mark.parametrize("kind", ["own", "if"])
def test_infinite_blur_is_attention_with_the_mean_query(kind):
    layer, x, text = layers_of(kind)
    out = processor_out(layer, x, text, INFINITE)
    with torch.no_grad():
        plain = hand_attention(layer, x[:4], None if text is None else text[:4])
        mean_q = hand_attention(layer, x[4:], None if text is None else text[4:],
                                lambda q: q.mean(2, keepdim=True).expand_as(q))
    torch.testing.assert_close(out[:4], plain)
    torch.testing.assert_close(out[4:], mean_q)
    # without the residual, one output vector repeated over the grid
    delta = (out[4:] * layer.rescale_output_factor - x[4:]).flatten(2)
    torch.testing.assert_close(delta, delta[..., :1].expand_as(delta))


def hand_gaussian_on_grid(q, h, w, sigma=1.0):
    """A 3x3 gaussian over the (h, w) raster grid of a (B, heads, h*w, d) query: reflect pad + 2-D convolution."""
    b, n_heads, n, d = q.shape
    taps = torch.exp(-0.5 * (torch.arange(-1.0, 2.0) / sigma) ** 2)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    maps = q.permute(0, 1, 3, 2).reshape(-1, 1, h, w)
    blurred = F.conv2d(F.pad(maps, (1, 1, 1, 1), mode="reflect"), kernel[None, None])
    return blurred.reshape(b, n_heads, d, n).permute(0, 1, 3, 2)


@pytest.mark.parametrize("kind", ["own", "if"])
def test_finite_blur_uses_the_maps_own_grid(kind):
    layer, x, text = layers_of(kind)  # a 4 x 6 map; latent_hw (6, 4) would tile the 24 tokens the wrong way
    out = processor_out(layer, x, text, GAUSS)
    with torch.no_grad():
        want = hand_attention(layer, x[4:], None if text is None else text[4:],
                              lambda q: hand_gaussian_on_grid(q, 4, 6))
        wrong = hand_attention(layer, x[4:], None if text is None else text[4:],
                               lambda q: hand_gaussian_on_grid(q, 6, 4))
    torch.testing.assert_close(out[4:], want)
    assert not torch.allclose(out[4:], wrong, atol=1e-4)
    assert torch.equal(out[:4], processor_out(layer, x, text, None)[:4])
    assert torch.equal(processor_out(layer, x, text, GAUSS, perturb=False), processor_out(layer, x, text, None))


# ---------------------------------------------------------------- SEG on an EDM model, as the commands install it

def test_seg_on_an_edm_model():
    model = EDMPrecond(own_unet(), num_classes=3).eval()
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 1, 8, 8, generator=g), torch.full((2,), 2.0)
    cond, uncond = {"class_labels": torch.tensor([0, 1])}, {"class_labels": torch.tensor([3, 3])}
    state = attention.SegState()
    paths = attention.resolve_layers(model.net.unet, ["mid", "u0"])
    assert paths == ["mid_block.attentions.0", "up_blocks.0.attentions.0"]
    with attention.installed(model.net.unet, state, paths), torch.no_grad():
        guided = smoothed_energy(model, 2.0, 3.0, cond, uncond, state, lambda s: GAUSS)(x, sigma)
        d_u, d_c = model(x, sigma, **uncond), model(x, sigma, **cond)  # state.blur is None again: no blur
        state.roles, state.blur = ("seg",), GAUSS
        d_seg = model(x, sigma, **cond)
        state.blur = None
    torch.testing.assert_close(guided, d_u + 3.0 * (d_c - d_u) + 2.0 * (d_c - d_seg), atol=1e-5, rtol=1e-5)
    assert (d_seg - d_c).abs().max() > 1e-5
