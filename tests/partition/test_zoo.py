"""The partitioner on transformers' own architectures, built from small configs on the meta device.

Each expectation is written from the layout the family's modeling code reads (transformers 5,
``models/<family>/modeling_*.py``), row by row: which head (and Q, K or V) a row of a fused
projection feeds, which expert a row of a bank belongs to. The test then checks that the plan's
blocks group the rows exactly as that layout calls for under each preset:

- ``adam_mini``: Q and K one block per head, V and every other weight one per output row;
- ``adam_mini_paper``: Q and K per head, all of V one block, other weights one block per tensor
  (per expert for an expert bank);
- ``eve``: one block per output row of every weight used as a Linear.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_lowmem.partition import PRESETS, build_plan
from lightning_lowmem.partition.spec import ParamBlocks

transformers = pytest.importorskip("transformers", reason="the zoo is built from transformers' classes")

H, HEADS = 64, 4
D = H // HEADS
SMALL = dict(hidden_size=H, num_attention_heads=HEADS, num_hidden_layers=1, intermediate_size=96, vocab_size=100)
TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)


def meta(config_cls: str, model_cls: str, **fields) -> nn.Module:
    """A transformers model on the meta device; the plan must come out without any warning."""
    config = getattr(transformers, config_cls)(**fields)
    with torch.device("meta"):
        return getattr(transformers, model_cls)(config)


def plan_of(model: nn.Module, preset: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may be a guess
        return build_plan(model, preset)


# ---- what a row is, per preset -------------------------------------------------------------------
# A row's "place" is (role, head or None, expert or None, row). The label says which rows share a block.


def label(preset: str, role: str, row: int, head: int | None = None, expert: int = 0, bank_role: str = "mlp"):
    """The block a row belongs to under ``preset``, as a hashable label (equal labels = one block)."""
    if role in ("query", "key"):
        return ("row", expert, row) if preset == "eve" else (role, expert, head)
    if role == "value":
        return ("value", expert) if preset == "adam_mini_paper" else ("row", expert, row)
    if role in ("mlp", "linear", "attn_out"):  # weights used as a Linear
        return (role, expert) if preset == "adam_mini_paper" else ("row", expert, row)
    raise AssertionError(role)


def blocks(entry: ParamBlocks) -> list[int]:
    """The block of each row of the parameter's ``rows x cols`` view (experts first)."""
    index = entry.group_index()
    return list(range(entry.rows)) if index is None else index.tolist()


def assert_blocks(entry: ParamBlocks, labels: list) -> None:
    """The plan's blocks and the layout's labels partition the rows the same way."""
    got = blocks(entry)
    assert len(got) == len(labels) == entry.rows, (entry.name, len(got), len(labels))
    block_of_label: dict = {}
    label_of_block: dict = {}
    for row, (block, want) in enumerate(zip(got, labels, strict=True)):
        assert block_of_label.setdefault(want, block) == block, f"{entry.name}: row {row} ({want}) is split off"
        assert label_of_block.setdefault(block, want) == want, f"{entry.name}: row {row} ({want}) joins {label_of_block[block]}"
    assert entry.state_numel == len(block_of_label)


def check(model: nn.Module, layouts: dict[str, Callable[[str], list]]) -> None:
    for preset in PRESETS:
        plan = plan_of(model, preset)
        for name, layout in layouts.items():
            assert_blocks(plan[name], layout(preset))


# ---- layouts read from the modeling code -----------------------------------------------------------


def per_head_interleaved(heads: int, head_dim: int) -> Callable[[str], list]:
    """``[heads, 3, head_dim]`` (GPT-NeoX, Bloom, Falcon-RW, GPT-BigCode MHA)."""
    def rows(preset: str) -> list:
        return [label(preset, ("query", "key", "value")[r // head_dim % 3], r, r // (3 * head_dim))
                for r in range(3 * heads * head_dim)]
    return rows


def contiguous(q_heads: int, kv_heads: int, head_dim: int, order=("query", "key", "value")) -> Callable[[str], list]:
    """``[Q | K | V]`` (GPT-2, Phi-3, nn.MultiheadAttention), K and V with ``kv_heads`` heads."""
    sizes = {"query": q_heads * head_dim, "key": kv_heads * head_dim, "value": kv_heads * head_dim}

    def rows(preset: str) -> list:
        out = []
        for role in order:
            out += [label(preset, role, len(out) + r, r // head_dim) for r in range(sizes[role])]
        return out
    return rows


def single(role: str, rows_: int, head_dim: int | None = None) -> Callable[[str], list]:
    return lambda preset: [label(preset, role, r, r // head_dim if head_dim else None) for r in range(rows_)]


def bank(experts: int, out: int, role: str = "mlp") -> Callable[[str], list]:
    """An expert bank's rows view: expert ``e``'s output rows ``e * out ... (e + 1) * out - 1``."""
    return lambda preset: [label(preset, role, r % out, expert=r // out) for r in range(experts * out)]


# ---- mixture of experts ------------------------------------------------------------------------------


MOE = dict(num_key_value_heads=2, **SMALL)


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "fields", "experts", "inter"),
    [
        ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4), 4, 96),
        ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
         dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48), 4, 32),
        ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=32, head_dim=16), 4, 32),
        ("DeepseekV3Config", "DeepseekV3ForCausalLM",
         dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
              first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
              v_head_dim=12), 4, 32),
    ],
)
def test_expert_banks_out_in_per_expert_rows(config_cls, model_cls, fields, experts, inter) -> None:
    """``gate_up_proj [E, 2 * inter, H]`` and ``down_proj [E, H, inter]`` are used as ``F.linear(x,
    bank[e])``: rows are dim 1, per expert; the router ``[E, H]`` has one output row per expert."""
    model = meta(config_cls, model_cls, **{**MOE, **fields})
    prefix = "model.layers.0.mlp."
    router = "gate.weight"
    check(model, {
        prefix + "experts.gate_up_proj": bank(experts, 2 * inter),
        prefix + "experts.down_proj": bank(experts, H),
        prefix + router: single("linear", experts),
    })
    plan = plan_of(model, "adam_mini")
    entry = plan[prefix + "experts.down_proj"]
    assert (entry.bank_dims, entry.transposed, entry.state_shape()) == (1, False, (experts, H))


def test_gpt_oss_transposed_expert_banks_and_bias_banks() -> None:
    """GPT-OSS stores ``[E, in, out]`` (``x @ bank[e] + bias[e]``): rows are the last dim, per expert;
    bias banks ``[E, out]`` are per expert too (one block per expert under the paper preset)."""
    model = meta("GptOssConfig", "GptOssForCausalLM", num_local_experts=4, head_dim=16, **MOE)
    prefix = "model.layers.0.mlp."
    check(model, {
        prefix + "experts.gate_up_proj": bank(4, 2 * 96),
        prefix + "experts.down_proj": bank(4, H),
        prefix + "router.weight": single("linear", 4),
    })
    plan = plan_of(model, "adam_mini_paper")
    gate_up = plan[prefix + "experts.gate_up_proj"]
    assert (gate_up.shape, gate_up.transposed, gate_up.rows, gate_up.cols) == ((4, H, 192), True, 4 * 192, H)
    bias = plan[prefix + "experts.gate_up_proj_bias"]
    assert (bias.role, bias.state_shape(), blocks(bias)) == ("bias", (4, 1), [e for e in range(4) for _ in range(192)])
    assert plan_of(model, "adam_mini")[prefix + "experts.down_proj_bias"].is_full
    sinks = plan["model.layers.0.self_attn.sinks"]  # one logit per head, added like a bias
    assert sinks.role == "bias" and sinks.shape == (HEADS,)


# ---- fused QKV layouts ---------------------------------------------------------------------------------


def test_gpt_neox_and_bloom_per_head_interleaved() -> None:
    neox = meta("GPTNeoXConfig", "GPTNeoXForCausalLM", **SMALL)
    check(neox, {"gpt_neox.layers.0.attention.query_key_value.weight": per_head_interleaved(HEADS, D)})
    bloom = meta("BloomConfig", "BloomForCausalLM", hidden_size=H, n_head=HEADS, n_layer=1, vocab_size=100)
    check(bloom, {"transformer.h.0.self_attention.query_key_value.weight": per_head_interleaved(HEADS, D)})


def test_falcon_three_layouts() -> None:
    falcon = dict(hidden_size=H, num_attention_heads=HEADS, num_hidden_layers=1, vocab_size=100)
    name = "transformer.h.0.self_attention.query_key_value.weight"
    rw = meta("FalconConfig", "FalconForCausalLM", multi_query=False, new_decoder_architecture=False, **falcon)
    check(rw, {name: per_head_interleaved(HEADS, D)})
    mq = meta("FalconConfig", "FalconForCausalLM", multi_query=True, new_decoder_architecture=False, **falcon)
    check(mq, {name: contiguous(HEADS, 1, D)})

    # new decoder: [kv_groups, heads / kv_groups + 2, head_dim]: each group's queries, then its K and V
    kv, q_per = 2, HEADS // 2
    new = meta("FalconConfig", "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=kv, **falcon)

    def grouped(preset: str) -> list:
        out = []
        for r in range(kv * (q_per + 2) * D):
            group, slot = divmod(r // D, q_per + 2)
            if slot < q_per:
                out.append(label(preset, "query", r, group * q_per + slot))
            else:
                out.append(label(preset, "key" if slot == q_per else "value", r, group))
        return out
    check(new, {name: grouped})


def test_gpt_bigcode_per_head_and_multi_query() -> None:
    fields = dict(n_embd=H, n_head=HEADS, n_layer=1, vocab_size=100)
    mha = meta("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=False, **fields)
    check(mha, {"transformer.h.0.attn.c_attn.weight": per_head_interleaved(HEADS, D)})
    mqa = meta("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=True, **fields)
    check(mqa, {"transformer.h.0.attn.c_attn.weight": contiguous(HEADS, 1, D)})


def test_codegen_shards_of_q_v_k() -> None:
    """``qkv.view(..., mp_num=4, 3 * local)`` split into Q, V, K; heads numbered shard by shard."""
    heads = 8
    model = meta("CodeGenConfig", "CodeGenForCausalLM", n_embd=H, n_head=heads, n_layer=1, vocab_size=100, rotary_dim=4)
    d, local = H // heads, H // 4

    def shards(preset: str) -> list:
        out = []
        for r in range(3 * H):
            shard, within = divmod(r, 3 * local)
            role = ("query", "value", "key")[within // local]
            out.append(label(preset, role, r, shard * (heads // 4) + within % local // d))
        return out
    check(model, {"transformer.h.0.attn.qkv_proj.weight": shards})


def test_phi3_contiguous_gqa() -> None:
    model = meta("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, **TOKENS, **SMALL)
    check(model, {"model.layers.0.self_attn.qkv_proj.weight": contiguous(HEADS, 2, D)})


def test_gpt2_cross_attention_k_v_and_q() -> None:
    """``c_attn`` of the cross-attention is ``[K | V]`` (Conv1D, transposed), ``q_attn`` is Q."""
    model = meta("GPT2Config", "GPT2LMHeadModel", n_embd=H, n_head=HEADS, n_layer=1, vocab_size=100,
                 add_cross_attention=True)
    check(model, {
        "transformer.h.0.attn.c_attn.weight": contiguous(HEADS, HEADS, D),
        "transformer.h.0.crossattention.c_attn.weight": contiguous(0, HEADS, D, order=("key", "value")),
        "transformer.h.0.crossattention.q_attn.weight": single("query", H, D),
    })


def test_deepseek_mla() -> None:
    """``q_b_proj`` per head of ``nope + rope`` rows; ``kv_b_proj`` per head ``[k_nope | v]``;
    ``kv_a_proj_with_mqa`` is ``[kv_lora_rank latent | one shared rope key]``."""
    nope, rope, v, lora = 8, 4, 12, 16
    model = meta("DeepseekV3Config", "DeepseekV3ForCausalLM", n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                 topk_group=1, moe_intermediate_size=32, first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=lora,
                 qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, **MOE)

    def kv_b(preset: str) -> list:
        return [label(preset, "key" if r % (nope + v) < nope else "value", r, r // (nope + v))
                for r in range(HEADS * (nope + v))]

    def kv_a(preset: str) -> list:
        return [label(preset, "linear", r) if r < lora else label(preset, "key", r, 0) for r in range(lora + rope)]
    prefix = "model.layers.0.self_attn."
    check(model, {
        prefix + "q_b_proj.weight": single("query", HEADS * (nope + rope), nope + rope),
        prefix + "kv_b_proj.weight": kv_b,
        prefix + "kv_a_proj_with_mqa.weight": kv_a,
        prefix + "q_a_proj.weight": single("linear", 32),
    })


# ---- separate projections with other names, output heads, position tables ------------------------------


def test_deberta_and_distilbert_projections() -> None:
    deberta = meta("DebertaV2Config", "DebertaV2Model", **SMALL)
    prefix = "encoder.layer.0.attention.self."
    check(deberta, {prefix + "query_proj.weight": single("query", H, D), prefix + "key_proj.weight": single("key", H, D),
                    prefix + "value_proj.weight": single("value", H)})
    distil = meta("DistilBertConfig", "DistilBertForSequenceClassification", dim=H, n_heads=HEADS, n_layers=1,
                  hidden_dim=96, vocab_size=100)
    prefix = "distilbert.transformer.layer.0.attention."
    check(distil, {prefix + "q_lin.weight": single("query", H, D), prefix + "k_lin.weight": single("key", H, D)})


def test_bert_hidden_equal_to_positions_and_a_two_class_head() -> None:
    """hidden == max_position_embeddings == 512: Q and K keep their heads; the classifier Linear(H, 2)
    (shaped like the token-type table) is the output head, as the model returns its logits."""
    model = meta("BertConfig", "BertForSequenceClassification", hidden_size=512, num_attention_heads=8,
                 num_hidden_layers=1, intermediate_size=96, vocab_size=100, max_position_embeddings=512)
    prefix = "bert.encoder.layer.0.attention.self."
    check(model, {prefix + "query.weight": single("query", 512, 64), prefix + "key.weight": single("key", 512, 64)})
    plan = plan_of(model, "adam_mini_paper")
    assert (plan["classifier.weight"].role, plan["classifier.weight"].kind) == ("output", "full")
    assert plan["bert.embeddings.token_type_embeddings.weight"].role == "embedding"
    assert plan["bert.pooler.dense.weight"].role == "linear"
    base = meta("BertConfig", "BertModel", hidden_size=512, num_attention_heads=8, num_hidden_layers=1,
                intermediate_size=96, vocab_size=100, max_position_embeddings=512)
    assert "output" not in {entry.role for entry in plan_of(base, "adam_mini").values()}  # no logits, no head


def test_vit_position_table_one_block_per_position() -> None:
    model = meta("ViTConfig", "ViTForImageClassification", hidden_size=H, num_attention_heads=HEADS,
                 num_hidden_layers=1, intermediate_size=96, image_size=32, patch_size=8)
    positions = (32 // 8) ** 2 + 1
    entry = plan_of(model, "adam_mini")["vit.embeddings.position_embeddings"]
    assert (entry.shape, entry.state_numel, entry.cols) == ((1, positions, H), positions, H)
    assert plan_of(model, "adam_mini")["vit.embeddings.cls_token"].state_numel == 1
    assert plan_of(model, "adam_mini_paper")["vit.embeddings.position_embeddings"].is_full
    assert plan_of(model, "adam_mini")["classifier.weight"].role == "output"


def test_torch_multihead_attention_kdim_vdim_and_transformer() -> None:
    mha = nn.MultiheadAttention(H, HEADS, kdim=24, vdim=40)
    check(mha, {"q_proj_weight": single("query", H, D), "k_proj_weight": single("key", H, D),
                "v_proj_weight": single("value", H)})
    assert plan_of(mha, "adam_mini")["k_proj_weight"].shape == (H, 24)
    with torch.device("meta"):
        model = nn.Transformer(d_model=H, nhead=HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=96)
    check(model, {
        "encoder.layers.0.self_attn.in_proj_weight": contiguous(HEADS, HEADS, D),
        "decoder.layers.0.multihead_attn.in_proj_weight": contiguous(HEADS, HEADS, D),
        "encoder.layers.0.linear1.weight": single("linear", 96),
    })


# ---- when unsure, one warning; user rules ----------------------------------------------------------------


class _Bank(nn.Module):
    """An experts module that does not say how its bank is stored."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 3
        self.w = nn.Parameter(torch.zeros(3, 5, 7))
        self.scale = nn.Parameter(torch.zeros(6, 2))


def test_one_warning_lists_each_unsure_parameter_with_its_rule() -> None:
    with pytest.warns(UserWarning) as record:
        plan = build_plan(_Bank(), "adam_mini")
    assert len(record) == 1
    message = str(record[0].message)
    assert "w [3, 5, 7] -> row per slice of [3]: expert bank on a _Bank" in message
    assert "scale [6, 2] -> tensor: parameter 'scale' registered directly" in message
    assert "rules={r'^w$': 'tensor'}" in message
    assert plan["w"].state_numel == 3 * 5  # read as [E, out, in]


def test_rules_give_per_expert_rows_and_interleaved_heads() -> None:
    """A rule's spec applies per expert of a bank; a pattern rule describes an interleaved layout."""
    plan = build_plan(_Bank(), "adam_mini", rules={r"^w$": "tensor", r"^scale$": "row"})
    assert blocks(plan["w"]) == [e for e in range(3) for _ in range(5)]
    neox = meta("GPTNeoXConfig", "GPTNeoXForCausalLM", **SMALL)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    pattern = {"segments": [["head:16", 16], ["head:16", 16], ["tensor", 16]], "repeat": HEADS}
    ruled = build_plan(neox, "eve", rules={name.replace(".", r"\."): pattern})
    assert_blocks(ruled[name], per_head_interleaved(HEADS, D)("adam_mini_paper"))
    with pytest.raises(ValueError, match="segments cover 48 rows x 3 periods but the parameter has 192"):
        build_plan(neox, "eve", rules={name.replace(".", r"\."): {**pattern, "repeat": 3}})


# ---- a 70B-class mixture of experts on the meta device ------------------------------------------------------


def test_a_70b_class_moe_is_planned_in_seconds() -> None:
    """Mixtral-8x22B's shapes (141B parameters): built and planned on the meta device."""
    from lightning_lowmem.models.hf import build_hf_model, hf_config

    config = hf_config(dict(model_type="mixtral", hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                            num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, vocab_size=32768))
    start = time.perf_counter()
    model = build_hf_model(config)
    plan = plan_of(model, "adam_mini")
    elapsed = time.perf_counter() - start
    assert plan.num_params == 140_630_071_296
    experts = 56 * 8 * (2 * 16384 + 6144)
    assert sum(entry.state_numel for entry in plan.values() if entry.bank_dims) == experts
    assert elapsed < 60, elapsed
    assert math.isclose(plan.state_bytes() / (8 * plan.num_params), 0.5, rel_tol=1e-3)


# ---- the optimizers take the new layouts ---------------------------------------------------------------------


class _Experts(nn.Module):
    """An experts module as transformers 5 writes them: banks, bias banks, a transposition flag."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.num_experts, self.is_transposed = 3, transposed
        self.up = nn.Parameter(torch.randn(3, 7, 5) if transposed else torch.randn(3, 5, 7))
        self.up_bias = nn.Parameter(torch.randn(3, 5))


def _element_blocks(entry: ParamBlocks) -> torch.Tensor:
    """The block of every element of a bank, from the plan's row blocks: element ``(e, o, i)`` of an
    ``[E, out, in]`` bank (``(e, i, o)`` of a transposed one) is in the block of row ``e * out + o``."""
    rows = torch.tensor(blocks(entry)).view(entry.banks, entry.bank_rows)
    if entry.transposed:
        return rows[:, None, :].expand(entry.shape)
    return rows.view(*rows.shape, *([1] * (len(entry.shape) - 2))).expand(entry.shape)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("preset", ["adam_mini", "adam_mini_paper"])
def test_adam_mini_updates_a_bank_per_expert_block(transposed: bool, preset: str) -> None:
    """Two steps of AdamMini on expert banks equal Adam with v shared within each expert's blocks
    (float64 reference written from the definition, over every element)."""
    from lightning_lowmem import AdamMini

    torch.manual_seed(0)
    module = _Experts(transposed).double()
    reference = {name: p.detach().clone() for name, p in module.named_parameters()}
    plan = build_plan(module, preset)
    opt = AdamMini(module, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, plan=plan)
    state = {name: (torch.zeros_like(p), None) for name, p in reference.items()}
    for step in (1, 2):
        grads = {name: torch.randn_like(p) for name, p in reference.items()}
        for name, p in module.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        for name, p in reference.items():
            entry, g = plan[name], grads[name]
            m = 0.9 * state[name][0] + 0.1 * g
            if entry.is_full:
                sq = g * g
            else:
                index = _element_blocks(entry).reshape(-1)
                sums = torch.zeros(entry.state_numel, dtype=g.dtype).index_add_(0, index, (g * g).reshape(-1))
                counts = torch.zeros(entry.state_numel, dtype=g.dtype).index_add_(0, index, torch.ones_like(index, dtype=g.dtype))
                sq = (sums / counts)[index].view(g.shape)
            v = (0.99 * state[name][1] if state[name][1] is not None else 0) + 0.01 * sq
            state[name] = (m, v)
            p -= 0.1 * (m / (1 - 0.9**step)) / ((v / (1 - 0.99**step)).sqrt() + 1e-8)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p, reference[name], rtol=1e-10, atol=1e-12, msg=f"{preset} {name} step {step}")
    assert tuple(opt.state[module.up]["exp_avg_sq"].shape) == plan["up"].state_shape() == (3, 5 if preset == "adam_mini" else 1)


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "fields"),
    [
        ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_key_value_heads=2)),
        ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_key_value_heads=2, head_dim=8)),
        ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    ],
)
def test_tiny_moe_and_neox_train_with_adam_mini_and_eve(config_cls, model_cls, fields) -> None:
    """A few steps on one repeated batch: the loss falls under every preset."""
    from lightning_lowmem import AdamMini, Eve

    config = getattr(transformers, config_cls)(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                               intermediate_size=48, vocab_size=50, **fields)
    for make in (lambda m: AdamMini(m, lr=1e-2), lambda m: AdamMini(m, lr=1e-2, preset="adam_mini_paper"),
                 lambda m: Eve(m, lr=1e-2)):
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = make(model)
        tokens = torch.randint(0, 50, (4, 16))
        losses = []
        for _ in range(6):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("preset", ["adam_mini", "adam_mini_paper"])
def test_interleaved_qkv_same_update_on_every_cpu_backend(preset: str) -> None:
    """GPT-NeoX's [heads, 3, head_dim] blocks (V shared across heads under the paper) through the C
    kernel (its in-order block runs) and the torch path (any block index) give the same weights."""
    from lightning_lowmem import AdamMini

    config = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                        intermediate_size=48, vocab_size=50)
    weights = {}
    for backend in ("torch", "native"):
        torch.manual_seed(0)
        model = transformers.GPTNeoXForCausalLM(config)
        opt = AdamMini(model, lr=1e-2, preset=preset, backend=backend)
        tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
        weights[backend] = model.gpt_neox.layers[0].attention.query_key_value.weight.detach().clone()
    torch.testing.assert_close(weights["native"], weights["torch"], rtol=1e-5, atol=1e-6)
