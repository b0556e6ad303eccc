"""Default band layouts (training/layouts.py) on real architectures.

For each architecture the default layout must partition the trainable
parameters head first (resolve_bands succeeds; deeper bands hold earlier
parameters), its boundaries must separate the bands (check_routing), and the
gated model must export. The HuggingFace models are the library's own classes
built from small configs (no downloads); the ResNet and ViT are tests/archs.py's
re-implementations with torchvision's and timm's module names, since neither
library installs beside the CPU torch here. Unknown structures, stray
parameters and tied embeddings must be refused with the parameter named.
"""

from __future__ import annotations

import re
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from archs import BasicBlock, HFLogits, ResNet, resnet18, vit
from gradledger.training.bands import Band, BandLayout, resolve_bands, sequential_bands, transformer_bands
from gradledger.training.errors import BandError
from gradledger.training.gate import GatedModel, check_routing, export_gated
from gradledger.training.layouts import (
    default_band_names,
    default_layout,
    describe_layout,
    detect_architecture,
    layout_or_default,
)

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def assert_head_first_partition(model: nn.Module, layout: BandLayout) -> None:
    """Every trainable tensor in exactly one band, and band index non-increasing along registration order."""
    bands = resolve_bands(model, layout)  # refuses uncovered, overlapping and tied-across-band parameters
    owner = bands.band_of()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(len(ps) for ps in bands.params) == len(trainable)
    assert {id(p) for ps in bands.params for p in ps} == trainable
    order = [owner[n] for n, p in model.named_parameters() if p.requires_grad]
    # Deeper layers are registered first in all these architectures, so the deepest band comes first.
    assert order == sorted(order, reverse=True), order
    assert layout.bands[0].boundary is None and all(b.boundary for b in layout.bands[1:])


def gate(model: nn.Module, layout: BandLayout) -> GatedModel:
    # GatedModel starts in training mode whatever the wrapped model's mode, and check_routing
    # restores the gate's mode, which .train() propagates: an eval-mode model (BatchNorm on running
    # statistics, dropout off) would come back in training mode. Mirror the model's mode.
    return GatedModel(model, layout).train(model.training)


def route_and_export(model: nn.Module, layout: BandLayout, x: Tensor) -> None:
    gated = gate(model, layout)
    try:
        check_routing(gated, x)
        profiles = torch.ones(x.shape[0], len(layout))
        program = export_gated(gated, x, profiles)
        # The exported program computes what the eager gate does.
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, profiles), gated(x, profiles))
    finally:
        gated.remove_hooks()


def band_sets(model: nn.Module, layout: BandLayout) -> list[set[str]]:
    return [set(ns) for ns in resolve_bands(model, layout).param_names]


# ---------------------------------------------------------------- sequential


def make_mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@SETTINGS
@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=8),
    data=st.data(),
)
def test_sequential_default_is_sequential_bands(widths: list[int], data: st.DataObject) -> None:
    model = make_mlp(widths)
    m = len(widths) - 1
    n = data.draw(st.integers(1, m), label="n_bands")
    layout = default_layout(model, n)
    assert layout == sequential_bands(model, n, default_band_names(n))
    assert_head_first_partition(model, layout)
    check_routing(gate(model, layout), torch.randn(3, widths[0]))


def test_sequential_too_many_bands_and_stray_parameter() -> None:
    model = make_mlp([3, 4, 2])
    with pytest.raises(BandError, match="cannot split 2"):
        default_layout(model, 3)
    model.register_parameter("temperature", nn.Parameter(torch.ones(())))
    with pytest.raises(BandError, match=r"1 trainable parameter\(s\) \[temperature\] in no band"):
        default_layout(model, 2)


# ---------------------------------------------------------------- ResNet


@pytest.fixture(scope="module")
def resnet() -> ResNet:
    torch.manual_seed(0)
    # Eval mode: BatchNorm on running statistics, so examples do not interact (specs/routing.md §1).
    return resnet18(num_classes=10).eval()


def test_resnet18_has_torchvisions_parameters(resnet: ResNet) -> None:
    # torchvision's resnet18 with 1000 classes has 11,689,512 parameters; names below are its state_dict keys.
    assert sum(p.numel() for p in resnet18().parameters()) == 11_689_512
    keys = resnet.state_dict().keys()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.num_batches_tracked", "fc.bias"):
        assert key in keys


def test_resnet_default_layout(resnet: ResNet) -> None:
    layout = default_layout(resnet)
    assert layout.names == ("head", "mid", "deep")
    assert layout.to_obj() == {
        "bands": [
            {"name": "head", "prefixes": ["fc"], "boundary": None},
            {"name": "mid", "prefixes": ["layer3", "layer4"], "boundary": "layer4"},
            {"name": "deep", "prefixes": ["conv1", "bn1", "layer1", "layer2"], "boundary": "layer2"},
        ]
    }
    assert detect_architecture(resnet) == "resnet"


@pytest.mark.parametrize("n_bands", [2, 3, 6])
def test_resnet_routes_and_exports(resnet: ResNet, n_bands: int) -> None:
    route_and_export(resnet, default_layout(resnet, n_bands), torch.randn(2, 3, 32, 32))


@settings(max_examples=12, deadline=None)
@given(blocks=st.lists(st.integers(1, 2), min_size=4, max_size=4), frozen_stem=st.booleans(), data=st.data())
def test_resnet_any_depth_and_band_count_is_a_head_first_partition(
    blocks: list[int], frozen_stem: bool, data: st.DataObject
) -> None:
    model = ResNet(BasicBlock, blocks, num_classes=3)
    if frozen_stem:
        # Frozen parameters may be in no band; the stem then stops being a unit of its own.
        for p in [*model.conv1.parameters(), *model.bn1.parameters()]:
            p.requires_grad_(False)
    most = 5 if frozen_stem else 6
    n = data.draw(st.integers(1, most), label="n_bands")
    layout = default_layout(model, n)
    assert len(layout) == n
    assert_head_first_partition(model, layout)
    assert layout.bands[0].prefixes == ("fc",) or n == 1
    with pytest.raises(BandError, match=f"at most {most} bands"):
        default_layout(model, most + 1)


def test_resnet_stray_parameter_is_named(resnet: ResNet) -> None:
    model = resnet18(num_classes=3)
    model.register_parameter("logit_scale", nn.Parameter(torch.ones(())))
    with pytest.raises(BandError, match=r"\[logit_scale\] in no band.*layout=BandLayout"):
        default_layout(model)


# ---------------------------------------------------------------- ViT (timm names)


@settings(max_examples=10, deadline=None)
@given(depth=st.integers(2, 5), data=st.data())
def test_vit_any_depth_and_band_count_routes(depth: int, data: st.DataObject) -> None:
    torch.manual_seed(depth)
    model = vit(img_size=8, patch_size=4, embed_dim=8, depth=depth, num_heads=2, num_classes=3).eval()
    n = data.draw(st.integers(1, depth + 2), label="n_bands")
    layout = default_layout(model, n)
    assert_head_first_partition(model, layout)
    assert layout.bands[0].prefixes == ("norm", "head") or n == 1
    if n == depth + 2:
        # The embeddings alone: the class token and positions join the stream before norm_pre.
        assert layout.bands[-1] == Band(layout.names[-1], ["cls_token", "pos_embed", "patch_embed"], "norm_pre")
    check_routing(gate(model, layout), torch.randn(2, 3, 8, 8))


def test_vit_has_timms_parameters() -> None:
    # timm's vit_tiny_patch16_224 has 5,717,416 parameters.
    model = vit(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 5_717_416
    assert [n for n, _ in model.named_parameters()][:4] == [
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"
    ]
    assert "blocks.11.attn.qkv.weight" in model.state_dict() and "blocks.0.mlp.fc2.bias" in model.state_dict()


def test_vit_three_bands_equal_transformer_bands() -> None:
    for depth in (2, 3, 4, 5):
        model = vit(embed_dim=8, depth=depth)
        assert band_sets(model, default_layout(model)) == band_sets(model, transformer_bands(model, "blocks"))


def test_vit_routes_and_exports() -> None:
    torch.manual_seed(0)
    model = vit().eval()
    for n in (3, 6):
        route_and_export(model, default_layout(model, n), torch.randn(2, 3, 32, 32))


def test_vit_stray_parameters_are_named() -> None:
    model = vit(embed_dim=8, depth=2)
    model.blocks.register_parameter("gamma", nn.Parameter(torch.ones(8)))  # on the block list: used by which block?
    with pytest.raises(BandError, match=r"\[blocks\.gamma\] in no band"):
        default_layout(model)


# ---------------------------------------------------------------- HuggingFace

try:
    import transformers  # an optional test dependency (the `test` extra)
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

HF_VOCAB = 64


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=3, return_dict=False,  # a tuple output, which the gate routes
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2(tie: bool = False) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=HF_VOCAB, n_embd=32, n_layer=4, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tie,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=HF_VOCAB, dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=16, num_labels=2
    )
    return HFLogits(transformers.DistilBertForSequenceClassification(cfg).eval())


# name -> (builder, blocks path, head prefixes, what carries the embeddings alone)
HF: dict[str, tuple[Callable[[], nn.Module], str, tuple[str, ...], str]] = {
    "bert": (bert, "bert.encoder.layer", ("bert.pooler", "classifier"), "bert.embeddings"),
    "gpt2": (lambda: HFLogits(gpt2()), "model.transformer.h", ("model.transformer.ln_f", "model.lm_head"),
             "model.transformer.drop"),
    "llama": (lambda: HFLogits(llama()), "model.model.layers", ("model.model.norm", "model.lm_head"),
              "model.model.embed_tokens"),
    "distilbert": (distilbert, "model.distilbert.transformer.layer", ("model.pre_classifier", "model.classifier"),
                   "model.distilbert.embeddings"),
}


@needs_hf
@pytest.mark.parametrize("arch", sorted(HF))
def test_huggingface_layouts_route_and_export(arch: str) -> None:
    build, blocks, head, emb_boundary = HF[arch]
    torch.manual_seed(0)
    model = build()
    n_blocks = len(model.get_submodule(blocks))
    assert detect_architecture(model) == f"transformer stack at {blocks!r}"
    x = torch.randint(0, HF_VOCAB, (2, 8))  # input_ids: the single positional tensor
    three = default_layout(model)
    assert three.bands[0].prefixes == head
    assert band_sets(model, three) == band_sets(model, transformer_bands(model, blocks))
    assert_head_first_partition(model, three)
    finest = default_layout(model, n_blocks + 2)
    assert finest.bands[-1].boundary == emb_boundary
    assert_head_first_partition(model, finest)
    route_and_export(model, three, x)
    route_and_export(model, finest, x)


@needs_hf
def test_gpt2_score_head_is_the_head() -> None:
    cfg = transformers.GPT2Config(vocab_size=HF_VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=8, pad_token_id=0,
                                  bos_token_id=0, eos_token_id=0, num_labels=2)
    model = transformers.GPT2ForSequenceClassification(cfg)
    assert default_layout(model).bands[0].prefixes == ("transformer.ln_f", "score")


@needs_hf
def test_tied_lm_head_is_refused_with_the_remedy() -> None:
    model = gpt2(tie=True)
    with pytest.raises(BandError, match=r"lm_head\.weight is the same tensor as transformer\.wte\.weight.*"
                                        r"tie_word_embeddings=False"):
        default_layout(model)
    assert_head_first_partition(model, default_layout(model, 1))  # one band: the tie stays within it


@needs_hf
@pytest.mark.parametrize(
    "stray, named",
    [
        # A bare parameter on the task model: HuggingFace heads are modules, so its role is unknown.
        (lambda m: m.register_parameter("temperature", nn.Parameter(torch.ones(()))), "temperature"),
        # Beside the layer list inside the encoder, as DeBERTa's shared relative embeddings: feeds every layer.
        (
            lambda m: setattr(m.bert.encoder, "rel_embeddings", nn.Embedding(4, 32)),
            "bert.encoder.rel_embeddings.weight",
        ),
        # On the layer list itself.
        (
            lambda m: m.bert.encoder.layer.register_parameter("gate", nn.Parameter(torch.ones(()))),
            "bert.encoder.layer.gate",
        ),
    ],
)
def test_huggingface_stray_parameters_are_named(stray: Callable[[nn.Module], None], named: str) -> None:
    model = bert()
    stray(model)
    with pytest.raises(BandError, match=rf"\[{re.escape(named)}\] in no band.*sequential_bands.*transformer_bands"):
        default_layout(model)


@needs_hf
def test_wrapper_parameter_is_named() -> None:
    model = HFLogits(llama())
    model.register_parameter("bias", nn.Parameter(torch.zeros(HF_VOCAB)))
    with pytest.raises(BandError, match=r"\[bias\] in no band"):
        default_layout(model)


@needs_hf
def test_encoder_decoder_is_refused() -> None:
    cfg = transformers.BartConfig(vocab_size=HF_VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                  decoder_ffn_dim=16, max_position_embeddings=16)
    model = transformers.BartForConditionalGeneration(cfg)
    with pytest.raises(BandError, match=r"2 block stacks.*model\.encoder\.layers.*model\.decoder\.layers"):
        default_layout(model)
    assert detect_architecture(model) is None


# ---------------------------------------------------------------- hand-written transformers, unknown models


class Residual(nn.Module):
    """x + tanh(fc(x)) * scale: the block's output is the residual stream, as in every real transformer block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        return x + torch.tanh(self.fc(x)) * scale


class SumEmbedTransformer(nn.Module):
    """A position table summed with token embeddings in forward: no module's output carries both."""

    def __init__(self, n_blocks: int = 3, d: int = 4, vocab: int = 7) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(5, d) * 0.1)
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Residual(d) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def test_summed_embeddings_travel_with_the_first_block() -> None:
    torch.manual_seed(0)
    model = SumEmbedTransformer(n_blocks=3)
    x = torch.randint(0, 7, (2, 5))
    finest = default_layout(model, 4)  # head + 3 blocks; the embeddings cannot be a band of their own
    assert finest.bands[-1] == Band("deep", ["pos_emb", "tok_emb", "blocks.0"], "blocks.0")
    check_routing(gate(model, finest), x)
    with pytest.raises(BandError, match="at most 4 bands"):
        default_layout(model, 5)
    # Why: tok_emb's output does not carry pos_emb, which check_routing detects.
    wrong = BandLayout(
        [*finest.bands[:-1], Band("deep", ["blocks.0"], "blocks.0"), Band("emb", ["pos_emb", "tok_emb"], "tok_emb")]
    )
    with pytest.raises(BandError, match="pos_emb.*bypasses the boundary"):
        check_routing(gate(model, wrong), x)


class RotaryFirst(nn.Module):
    """A parameter-free rotary table registered between the embedding and the layers: not the stream."""

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(2))

        def forward(self, x: Tensor) -> Tensor:
            return self.inv_freq.expand(x.shape[0], 2)

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(7, 4)
        self.rotary_emb = self.Rotary()
        self.layers = nn.ModuleList(Residual(4) for _ in range(2))
        self.norm = nn.LayerNorm(4)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed_tokens(idx)
        scale = self.rotary_emb(x)[:, :1, None]
        for layer in self.layers:
            x = layer(x, scale)
        return self.norm(x)


def test_parameter_free_siblings_are_not_boundaries() -> None:
    model = RotaryFirst()
    layout = default_layout(model, 4)  # norm, layers.1, layers.0, embed_tokens
    assert layout.bands[-1] == Band("deep", ["embed_tokens"], "embed_tokens")
    check_routing(gate(model, layout), torch.randint(0, 7, (2, 3)))


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleDict({f"f{i}": nn.Linear(2, 2) for i in range(6)})
        self.classifier = nn.Linear(2, 2)


def test_unknown_structure_names_its_parameters() -> None:
    with pytest.raises(BandError) as info:
        default_layout(Unknown())
    msg = str(info.value)
    assert "no default layout for Unknown" in msg
    assert "14 trainable parameter(s) [features.f0.weight, features.f0.bias" in msg
    assert "... and 6 more]" in msg  # the first 8 named, the count of the rest
    assert "classifier.bias" not in msg
    assert "layout=BandLayout" in msg and "sequential_bands" in msg
    assert detect_architecture(Unknown()) is None


# ---------------------------------------------------------------- names, overrides, description


def test_names_and_band_counts() -> None:
    model = vit(embed_dim=8, depth=2)
    assert default_layout(model, 1).names == ("head",)
    assert default_layout(model, 2).names == ("head", "deep")
    assert default_layout(model, 4).names == ("head", "mid1", "mid2", "deep")
    assert default_layout(model, 3, ["out", "body", "stem"]).names == ("out", "body", "stem")
    with pytest.raises(BandError, match="2 band names for 3 bands"):
        default_layout(model, 3, ["a", "b"])
    with pytest.raises(BandError, match="n_bands must be >= 1"):
        default_layout(model, 0)


def test_layout_or_default_prefers_the_override() -> None:
    model = vit(embed_dim=8, depth=2)
    assert layout_or_default(model) == default_layout(model)
    custom = transformer_bands(model, "blocks", lower_blocks=1, names=("head", "mid", "deep"))
    assert layout_or_default(model, custom) is custom
    with pytest.raises(BandError, match="in no band"):
        layout_or_default(model, BandLayout([Band("head", ["head"])]))


def test_describe_layout() -> None:
    model = vit(embed_dim=8, depth=2, num_classes=3)
    text = describe_layout(model)
    assert text.splitlines()[0] == "transformer stack at 'blocks': 3 band(s), head first"
    head = next(line for line in text.splitlines() if line.strip().startswith("head"))
    assert "43 params" in head and "model output" in head  # norm (8 + 8) + head (8 * 3 + 3)


def test_a_wrapper_around_one_network_gets_the_networks_layout_prefixed() -> None:
    # A LightningModule-like wrapper (no parameters of its own, one child holding all of them),
    # itself wrapped once more: the child's sequential layout, every path prefixed, resolved.
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.act = nn.ReLU()  # a parameter-free sibling does not count

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = Wrapper(Wrapper(net))
    want = sequential_bands(net, 3)
    got = default_layout(model)
    assert [b.prefixes for b in got.bands] == [tuple(f"inner.inner.{p}" for p in b.prefixes) for b in want.bands]
    assert [b.boundary for b in got.bands] == [None if b.boundary is None else f"inner.inner.{b.boundary}"
                                               for b in want.bands]
    resolve_bands(model, got)
    two = nn.Module()
    two.a, two.b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(BandError, match="no default layout"):
        default_layout(two)  # two children with parameters: no single network to follow
