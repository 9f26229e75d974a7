"""build_plan and build_plan_from_named_parameters: presets, rules, errors, the warning, the table."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from lightning_lowmem.partition import PRESETS, BlockPlan, BlockSpec, build_plan, build_plan_from_named_parameters
from lightning_lowmem.partition.presets import PRESET_TABLES
from lightning_lowmem.partition.structure import ROLES, ParamInfo, Part

# ------------------------------------------------------------------------------------------------
# Small models


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)


class TinyGPT(nn.Module):
    """nanoGPT with a tied head; V=50, E=32, 4 heads of 8, T=16, 2 layers."""

    def __init__(self, vocab: int = 50, n_embd: int = 32, n_head: int = 4, block_size: int = 16, n_layer: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


class WithUnknowns(nn.Module):
    """A Linear plus two raw parameters no structural rule covers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.pos_table = nn.Parameter(torch.zeros(7, 4))
        self.temperature = nn.Parameter(torch.tensor(1.0))


def _kinds(plan: BlockPlan) -> dict[str, str]:
    return {name: "|".join(str(spec) for spec, _ in entry.segments) for name, entry in plan.items()}


# ------------------------------------------------------------------------------------------------
# Presets: the role -> kind tables, written out independently of the code

EXPECTED = {
    "adam_mini": {
        "query": "head", "key": "head", "value": "row", "qkv": "head|head|row", "attn_out": "row", "mlp": "row",
        "linear": "row", "embedding": "row", "output": "row", "tied_embedding": "row", "bias": "full",
        "norm": "tensor", "conv": "tensor", "other": "tensor",
    },
    "adam_mini_paper": {
        "query": "head", "key": "head", "value": "tensor", "qkv": "head|head|tensor", "attn_out": "tensor",
        "mlp": "tensor", "linear": "tensor", "embedding": "full", "output": "full", "tied_embedding": "full",
        "bias": "tensor", "norm": "tensor", "conv": "tensor", "other": "tensor",
    },
    "eve": {
        "query": "row", "key": "row", "value": "row", "qkv": "row|row|row", "attn_out": "row", "mlp": "row",
        "linear": "row", "embedding": "full", "output": "row", "tied_embedding": "row", "bias": "full",
        "norm": "full", "conv": "full", "other": "full",
    },
}


def test_presets_listed() -> None:
    assert PRESETS == ("adam_mini", "adam_mini_paper", "eve")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("role", ROLES)
def test_preset_kind_for_each_role(preset: str, role: str) -> None:
    parts = (Part("query", 4, 4), Part("key", 4, 4), Part("value", 4)) if role == "qkv" else ()
    info = ParamInfo("p", (12, 4), role, head_dim=4, parts=parts)
    kinds = "|".join(spec.kind for spec, _ in PRESET_TABLES[preset].segments(info))
    assert kinds == EXPECTED[preset][role]


def test_head_kind_without_head_dim_is_row() -> None:
    info = ParamInfo("p", (12, 4), "query")
    assert PRESET_TABLES["adam_mini"].segments(info) == ((BlockSpec("row"), 12),)


def test_adam_mini_on_nanogpt() -> None:
    plan = build_plan(TinyGPT())
    assert plan.preset == "adam_mini"
    kinds = _kinds(plan)
    assert kinds["h.0.attn.c_attn.weight"] == "head:8|head:8|row"
    assert plan["h.0.attn.c_attn.weight"].state_numel == 4 + 4 + 32
    assert kinds["h.0.attn.c_attn.bias"] == "full"
    assert kinds["h.0.ln_1.weight"] == "tensor"
    assert kinds["h.0.mlp.c_fc.weight"] == kinds["wte.weight"] == kinds["wpe.weight"] == "row"


def test_multihead_attention_block_counts() -> None:
    """MHA(32, 4): Q and K 4 heads each, V 32 rows; out_proj 32 rows; biases full."""
    plan = build_plan(nn.MultiheadAttention(32, 4))
    fused = plan["in_proj_weight"]
    assert fused.segments == ((BlockSpec("head", 8), 32), (BlockSpec("head", 8), 32), (BlockSpec("row"), 32))
    assert fused.state_numel == 4 + 4 + 32
    assert fused.group_sizes() == [8] * 8 + [1] * 32
    assert plan["out_proj.weight"].state_numel == 32
    assert plan["in_proj_bias"].state_shape() == (96,)


def test_paper_state_count_formula() -> None:
    """v entries = V*E + T*E (embeddings full) + per layer (2*heads + 1 for c_attn + 11 other tensors)
    + 2 (ln_f); the tied head is counted once."""
    vocab, n_embd, n_head, block_size, n_layer = 50, 32, 4, 16, 2
    plan = build_plan(TinyGPT(vocab, n_embd, n_head, block_size, n_layer), preset="adam_mini_paper")
    expected_v = vocab * n_embd + block_size * n_embd + n_layer * (2 * n_head + 1 + 11) + 2
    assert sum(entry.state_numel for entry in plan.values()) == expected_v == 2154
    num_params = sum(p.numel() for p in TinyGPT(vocab, n_embd, n_head, block_size, n_layer).parameters())
    assert plan.num_params == num_params
    assert plan.state_bytes() == 4 * (num_params + expected_v)


def test_eve_untied_embedding_full_tied_row() -> None:
    tied = build_plan(TinyGPT(), preset="eve")
    assert (tied["wte.weight"].role, tied["wte.weight"].kind) == ("tied_embedding", "row")
    assert (tied["wpe.weight"].role, tied["wpe.weight"].kind) == ("embedding", "full")
    assert tied["h.0.attn.c_attn.weight"].kind == "row"
    assert tied["h.0.attn.c_attn.weight"].group_index() is None
    assert tied["h.0.ln_1.weight"].kind == tied["h.0.mlp.c_fc.bias"].kind == "full"


def test_llama_gqa_plan_from_config_on_meta() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = build_plan(model)
    q, k = plan["model.layers.0.self_attn.q_proj.weight"], plan["model.layers.0.self_attn.k_proj.weight"]
    assert (q.segments, q.state_numel) == (((BlockSpec("head", 16), 64),), 4)
    assert (k.segments, k.state_numel) == (((BlockSpec("head", 16), 32),), 2)
    assert plan["lm_head.weight"].role == "output"
    assert plan.num_params == sum(p.numel() for p in model.parameters())


def test_gpt2_plan_from_config_on_meta() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    plan = build_plan(model)
    c_attn = plan["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.transposed and (c_attn.rows, c_attn.cols) == (192, 64)
    assert _kinds(plan)["transformer.h.0.attn.c_attn.weight"] == "head:16|head:16|row"
    assert plan["lm_head.weight"] is plan["transformer.wte.weight"]
    assert len(plan) == len(list(model.parameters()))


def test_meta_plan_equals_cpu_plan() -> None:
    with torch.device("meta"):
        meta = TinyGPT()
    assert dict(build_plan(meta, preset="adam_mini_paper")) == dict(build_plan(TinyGPT(), preset="adam_mini_paper"))


def test_frozen_parameters_get_no_entry() -> None:
    model = TinyGPT()
    model.h[1].requires_grad_(False)
    plan = build_plan(model)
    assert "h.1.attn.c_attn.weight" not in plan
    assert "h.0.attn.c_attn.weight" in plan


def test_include_frozen_plans_frozen_layers_from_their_structure() -> None:
    """A frozen layer is planned like its trainable twin (fused QKV by head), and stays frozen."""
    model = TinyGPT()
    model.h[1].requires_grad_(False)
    plan = build_plan(model, include_frozen=True)
    assert plan["h.1.attn.c_attn.weight"].segments == plan["h.0.attn.c_attn.weight"].segments
    assert plan["h.1.attn.c_attn.weight"].kind == "mixed"
    assert not any(p.requires_grad for p in model.h[1].parameters())


# ------------------------------------------------------------------------------------------------
# Rules


def test_rules_override_first_match_wins_role_kept() -> None:
    plan = build_plan(TinyGPT(), rules=[(r"c_attn\.weight$", "head:4"), (r"\.attn\.", "full"), (r"wpe", "tensor")])
    c_attn = plan["h.0.attn.c_attn.weight"]
    assert (c_attn.segments, c_attn.role) == (((BlockSpec("head", 4), 96),), "qkv")
    assert plan["h.0.attn.c_proj.weight"].kind == "full"
    assert (plan["wpe.weight"].kind, plan["wpe.weight"].role) == ("tensor", "embedding")
    assert plan["h.0.mlp.c_fc.weight"].kind == "row"  # untouched by the rules


def test_shadowed_rule_is_not_an_error() -> None:
    """The second rule matches `wte` too (so it is no typo) but the first one wins."""
    plan = build_plan(TinyGPT(), rules=[("wte", "full"), ("wte", "tensor")])
    assert plan["wte.weight"].kind == "full"


def test_rules_mapping_and_alias_match() -> None:
    """A rule naming only the alias (`lm_head`) reaches the tied entry."""
    plan = build_plan(TinyGPT(), rules={r"^lm_head\.weight$": {"kind": "full"}})
    assert plan["wte.weight"].kind == "full"


def test_precompiled_rule_keeps_its_flags() -> None:
    plan = build_plan(TinyGPT(), rules=[(re.compile(r"^WPE\.", re.IGNORECASE), "tensor")])
    assert plan["wpe.weight"].kind == "tensor"


def test_rule_on_transposed_weight_uses_output_rows() -> None:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    plan = build_plan(nn.ModuleDict({"c_fc": conv1d(24, 8)}), rules={"c_fc.weight": "head:6"})
    assert plan["c_fc.weight"].state_numel == 24 // 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "adamw"}, "Unknown block preset 'adamw'; choose one of adam_mini, adam_mini_paper, eve"),
        ({"rules": {"nope": "row"}}, r"Rule 'nope' matches no trainable parameter.*'wte.weight'"),
        ({"rules": {"h.(": "row"}}, r"Rule 'h.\(' is not a valid regular expression"),
        ({"rules": {"wte": "rows"}}, r"Rule 'wte': Unknown block kind 'rows'"),
        ({"rules": "wte"}, "rules must be a mapping"),
        ({"rules": [("wte",)]}, r"Each rule must be a \(regex, spec\) pair"),
        (
            {"rules": {r"h\.0\.mlp\.c_fc\.weight": "head:5"}},
            r"Rule r'h\\\.0\\\.mlp\\\.c_fc\\\.weight' -> head:5 does not fit h\.0\.mlp\.c_fc\.weight "
            r"\(shape \[128, 32\]\): head_dim=5 does not divide the 128 rows",
        ),
    ],
)
def test_build_plan_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_plan(TinyGPT(), **kwargs)


def test_rule_matching_only_frozen_parameters() -> None:
    model = TinyGPT()
    model.wpe.requires_grad_(False)
    with pytest.raises(ValueError, match=r"only matches frozen parameters.*'wpe.weight'"):
        build_plan(model, rules={"wpe": "full"})


# ------------------------------------------------------------------------------------------------
# The single warning


def test_one_warning_names_every_unknown_parameter() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = build_plan(WithUnknowns())
    ours = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "pos_table [7, 4] -> tensor" in message and "temperature [] -> tensor" in message
    assert "rules=" in message and "fc.weight" not in message
    assert plan["pos_table"].kind == plan["temperature"].kind == "tensor"
    with pytest.warns(UserWarning, match="temperature"):
        assert build_plan(WithUnknowns(), preset="eve")["pos_table"].kind == "full"


def test_rules_silence_the_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = build_plan(WithUnknowns(), rules={"^pos_table$": "row", "^temperature$": "tensor"})
    assert plan["pos_table"].kind == "row"


# ------------------------------------------------------------------------------------------------
# The table


def test_summary_has_each_kind_and_the_saving() -> None:
    """Linear(4, 3) + LayerNorm(3) + MHA(4, 2 heads) under adam_mini, by hand:

    params: fc 12 + 3, ln 3 + 3, in_proj 48 + 12, out_proj 16 + 4 = 101
    v:      fc 3 (row) + 3 (full), ln 1 (tensor) + 3 (full), in_proj 2 + 2 (heads) + 4 (V rows)
            + 12 (full), out_proj 4 (row) + 4 (full) = 38
    state 4 * (101 + 38) = 556 bytes vs AdamW 8 * 101 = 808: 31.2% saved.
    """
    model = nn.ModuleDict({"fc": nn.Linear(4, 3), "ln": nn.LayerNorm(3), "attn": nn.MultiheadAttention(4, 2)})
    plan = build_plan(model)
    assert (plan.num_params, plan.state_bytes()) == (101, 556)
    table = str(plan)
    for kind in ("full", "row", "head", "tensor", "total"):
        assert re.search(rf"^{kind}\s", table, re.MULTILINE), kind
    assert "(31.2% saved)" in table
    assert "Block plan (adam_mini)" in table


# ------------------------------------------------------------------------------------------------
# Names only


def _gpt2_like_shapes() -> dict[str, torch.Size]:
    return {
        "transformer.wte.weight": torch.Size([100, 64]),
        "transformer.h.0.ln_1.weight": torch.Size([64]),
        "transformer.h.0.attn.c_attn.weight": torch.Size([64, 192]),
        "transformer.h.0.attn.c_attn.bias": torch.Size([192]),
        "transformer.h.0.mlp.c_fc.weight": torch.Size([64, 256]),
        "model.layers.0.self_attn.q_proj.weight": torch.Size([64, 48]),
        "model.layers.0.self_attn.k_proj.weight": torch.Size([32, 48]),
        "lm_head.weight": torch.Size([100, 64]),
        "scale": torch.Size([]),
    }


def test_named_parameters_with_head_dim() -> None:
    with pytest.warns(UserWarning, match="'scale'|scale"):
        plan = build_plan_from_named_parameters(_gpt2_like_shapes(), head_dim=16)
    roles = {name: entry.role for name, entry in plan.items()}
    assert roles == {
        "transformer.wte.weight": "embedding",
        "transformer.h.0.ln_1.weight": "norm",
        "transformer.h.0.attn.c_attn.weight": "qkv",
        "transformer.h.0.attn.c_attn.bias": "bias",
        "transformer.h.0.mlp.c_fc.weight": "linear",
        "model.layers.0.self_attn.q_proj.weight": "query",
        "model.layers.0.self_attn.k_proj.weight": "key",
        "lm_head.weight": "output",
        "scale": "other",
    }
    c_attn = plan["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.transposed and _kinds(plan)["transformer.h.0.attn.c_attn.weight"] == "head:16|head:16|row"
    assert plan["model.layers.0.self_attn.k_proj.weight"].state_numel == 2


def test_named_parameters_without_head_dim_use_rows() -> None:
    shapes = {k: v for k, v in _gpt2_like_shapes().items() if k != "scale"}
    plan = build_plan_from_named_parameters(shapes)
    assert plan["model.layers.0.self_attn.q_proj.weight"].kind == "row"
    assert (plan["transformer.h.0.attn.c_attn.weight"].role, plan["transformer.h.0.attn.c_attn.weight"].kind) == (
        "linear", "row"
    )


def test_named_parameters_of_a_model_tied_and_frozen() -> None:
    """Passing named_parameters(remove_duplicate=False): the tied tensor is one entry; frozen ones go."""
    model = TinyGPT()
    model.ln_f.requires_grad_(False)
    plan = build_plan_from_named_parameters(model.named_parameters(remove_duplicate=False), preset="eve", head_dim=8)
    assert plan["lm_head.weight"] is plan["wte.weight"]
    assert (plan["wte.weight"].role, plan["wte.weight"].kind) == ("tied_embedding", "row")
    assert "ln_f.weight" not in plan
    assert plan["h.0.attn.c_attn.weight"].segments[0] == (BlockSpec("row"), 32)


@pytest.mark.parametrize("head_dim", [0, -4, 2.0, True])
def test_named_parameters_bad_head_dim(head_dim: object) -> None:
    with pytest.raises(ValueError, match="head_dim must be a positive integer or None"):
        build_plan_from_named_parameters({"w": (4, 4)}, head_dim=head_dim)


def test_named_parameters_errors_match_build_plan() -> None:
    with pytest.raises(ValueError, match="choose one of adam_mini, adam_mini_paper, eve"):
        build_plan_from_named_parameters({"w": (4, 4)}, preset="x")
    with pytest.raises(ValueError, match="Rule 'v' matches no trainable parameter"):
        build_plan_from_named_parameters({"w": (4, 4)}, rules={"v": "row"})


# ------------------------------------------------------------------------------------------------
# FSDP2: DTensor parameters keep their global shape; fully_shard renames classes to FSDP<Name>


class Conv1D(nn.Module):
    """transformers' layout without importing it: weight [nx, nf], `nf` outputs."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.zeros(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class ShardedAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.c_attn, self.c_proj = Conv1D(3 * 6, 5), Conv1D(5, 6)


class GPTRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(5))


class ShardedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.attn, self.norm, self.head = nn.Embedding(7, 5), ShardedAttn(), GPTRMSNorm(), nn.Linear(5, 7)


def test_fsdp2_sharded_model_gets_the_unsharded_plan() -> None:
    """Rank 0 of 2 (fake process group, no communication): parameters are DTensor shards of dim 0,
    modules are renamed FSDP<Name>, and the plan is exactly the plain model's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="needs torch's fake backend")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    reference = build_plan(ShardedModel())
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        model = ShardedModel()
        for module in (model.attn.c_attn, model.attn, model.norm, model):
            fully_shard(module)
        assert (type(model.norm).__name__, type(model.attn.c_attn).__name__) == ("FSDPGPTRMSNorm", "FSDPConv1D")
        assert model.attn.c_attn.weight.to_local().shape == (3, 18)  # the local shard of [5, 18]
        plan = build_plan(model)
    finally:
        dist.destroy_process_group()
    assert dict(plan) == dict(reference)
    assert plan["attn.c_attn.weight"].segments[0] == (BlockSpec("head", 3), 6)
    assert plan["norm.weight"].role == "norm"
