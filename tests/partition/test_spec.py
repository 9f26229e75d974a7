"""BlockSpec, ParamBlocks and BlockPlan: the contract the optimizers rely on."""

from __future__ import annotations

import pytest
import torch

from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM, BlockPlan, BlockSpec, ParamBlocks


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("row", BlockSpec("row")),
        (" tensor ", BlockSpec("tensor")),
        ("head:64", BlockSpec("head", 64)),
        ({"kind": "head", "head_dim": 8}, BlockSpec("head", 8)),
        ({"kind": "full"}, BlockSpec("full")),
        (BlockSpec("row"), BlockSpec("row")),
    ],
)
def test_parse_accepts_every_form(value: object, expected: BlockSpec) -> None:
    """Strings, mappings and specs all parse to the same value."""
    assert BlockSpec.parse(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("rows", "Unknown block kind 'rows'"),
        ("head", "needs a positive integer head_dim"),
        ("head:0", "needs a positive integer head_dim"),
        ("head:x", "Cannot read block spec 'head:x'"),
        ("row:4", "Cannot read block spec 'row:4'"),
        ({"kind": "row", "head_dim": 4}, "only meaningful for 'head'"),
        ({"kind": "row", "dim": 3}, "takes the keys 'kind' and 'head_dim'"),
        (3, "Cannot read block spec 3 of type int"),
    ],
)
def test_parse_rejects_bad_specs(value: object, message: str) -> None:
    """Each bad spec fails with a message that names what was wrong."""
    with pytest.raises(ValueError, match=message):
        BlockSpec.parse(value)


@pytest.mark.parametrize(
    ("spec", "rows", "cols", "blocks"),
    [("full", 6, 4, 24), ("row", 6, 4, 6), ("head:3", 6, 4, 2), ("tensor", 6, 4, 1)],
)
def test_num_blocks_per_kind(spec: str, rows: int, cols: int, blocks: int) -> None:
    assert BlockSpec.parse(spec).num_blocks(rows, cols) == blocks


def test_head_dim_must_divide_rows() -> None:
    with pytest.raises(ValueError, match="head_dim=4 does not divide the 6 rows"):
        BlockSpec("head", 4).num_blocks(6)


def test_low_dimensional_shapes() -> None:
    """A 1-D weight is rows=len, cols=1 (row == full); a 0-dim one has one row."""
    vector = ParamBlocks.single("w", (5,), BlockSpec("row"))
    assert (vector.rows, vector.cols, vector.state_numel) == (5, 1, 5)
    scalar = ParamBlocks.single("t", (), BlockSpec("tensor"))
    assert (scalar.rows, scalar.cols, scalar.numel, scalar.state_numel) == (1, 1, 1, 1)


def test_transposed_rows_are_dim_one() -> None:
    """GPT-2's Conv1D weight [in, out]: rows are the 12 outputs, columns the 4 inputs."""
    entry = ParamBlocks.single("c_attn.weight", (4, 12), BlockSpec("row"), transposed=True)
    assert (entry.rows, entry.cols, entry.state_numel) == (12, 4, 12)


def test_fused_segments_counts_and_groups() -> None:
    """Q and K by head (2 heads of 2 rows each), V by row."""
    head = BlockSpec("head", 2)
    entry = ParamBlocks("qkv", (12, 3), ((head, 4), (head, 4), (BlockSpec("row"), 4)), role="qkv")
    assert entry.kind == "mixed"
    assert entry.state_numel == 2 + 2 + 4
    assert entry.state_shape() == (8,)
    assert entry.counts_by_kind() == {"head": (4, 24, 4), "row": (4, 12, 4)}
    assert entry.group_sizes() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert entry.group_index().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]


def test_row_groups_need_no_index_and_full_has_no_groups() -> None:
    assert ParamBlocks.single("w", (3, 2), BlockSpec("row")).group_index() is None
    full = ParamBlocks.single("w", (3, 2), BlockSpec("full"))
    assert full.state_shape() == (3, 2)
    with pytest.raises(ValueError, match="has no row groups"):
        full.group_sizes()


@pytest.mark.parametrize(
    ("shape", "segments", "transposed", "message"),
    [
        ((6, 2), ((BlockSpec("row"), 5),), False, "segments cover 5 rows but the parameter has 6"),
        ((6, 2), ((BlockSpec("full"), 3), (BlockSpec("row"), 3)), False, "must cover the whole parameter"),
        ((6, 2), ((BlockSpec("head", 4), 6),), False, r"w \(shape \[6, 2\]\): head_dim=4 does not divide"),
        ((6,), ((BlockSpec("row"), 6),), True, r"only 2-D weights \(after 0 bank dims\) can be transposed"),
    ],
)
def test_param_blocks_rejects_inconsistent_layouts(
    shape: tuple[int, ...], segments: tuple, transposed: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ParamBlocks("w", shape, segments, transposed=transposed)


def _plan() -> BlockPlan:
    """A tied embedding (row), a bias (full) and a norm (tensor)."""
    return BlockPlan(
        [
            ParamBlocks.single(
                "wte.weight", (10, 4), BlockSpec("row"), role="tied_embedding", aliases=("head.weight",)
            ),
            ParamBlocks.single("fc.bias", (4,), BlockSpec("full"), role="bias"),
            ParamBlocks.single("ln.weight", (4,), BlockSpec("tensor"), role="norm"),
        ],
        preset="adam_mini",
    )


def test_plan_aliases_resolve_and_count_once() -> None:
    plan = _plan()
    assert plan["head.weight"] is plan["wte.weight"]
    assert "head.weight" in plan and "missing" not in plan
    assert list(plan) == ["wte.weight", "fc.bias", "ln.weight"]
    assert plan.num_params == 40 + 4 + 4
    with pytest.raises(KeyError):
        plan["missing"]


def test_plan_rejects_duplicates() -> None:
    entry = ParamBlocks.single("a", (2,), BlockSpec("full"))
    with pytest.raises(ValueError, match="'a' appears twice"):
        BlockPlan([entry, entry])


def test_plan_state_bytes_and_table() -> None:
    """m is elementwise (48 entries), v has 10 + 4 + 1 entries; AdamW would keep 8 bytes x 48."""
    plan = _plan()
    assert plan.rows_by_kind() == {"full": (4, 4, 4), "row": (10, 40, 10), "tensor": (1, 4, 1)}
    assert plan.state_bytes() == 4 * (48 + 15)
    table = plan.summary()
    saving = 1 - 4 * (48 + 15) / (ADAMW_STATE_BYTES_PER_PARAM * 48)
    assert f"({saving:.1%} saved)" in table
    assert "Block plan (adam_mini): 3 tensors" in table
    assert "head.weight" in plan.details() and "tied_embedding" in plan.details()


def test_group_index_device() -> None:
    entry = ParamBlocks.single("w", (4, 2), BlockSpec("head", 2))
    assert entry.group_index(device="cpu").device == torch.device("cpu")


def test_patterns_and_banks_count_and_index_their_blocks() -> None:
    """[heads=2, (Q 2 rows | K 2 rows | V 2 rows)]: Q, K per head and V rows per period; a tensor V
    is one block over both periods; a bank repeats its layout per expert with new blocks."""
    head = BlockSpec("head", 2)
    neox = ParamBlocks("qkv", (12, 3), ((head, 2), (head, 2), (BlockSpec("row"), 2)), repeat=2)
    assert neox.group_index().tolist() == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 6, 7]
    assert neox.block_kinds() == ["head", "head", "row", "row"] * 2
    assert neox.counts_by_kind() == {"head": (4, 24, 4), "row": (4, 12, 4)}
    paper = ParamBlocks("qkv", (12, 3), ((head, 2), (head, 2), (BlockSpec("tensor"), 2)), repeat=2)
    assert paper.group_index().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 2, 2]
    assert paper.group_sizes() == [2, 2, 4, 2, 2] and paper.block_kinds() == ["head", "head", "tensor", "head", "head"]
    bank = ParamBlocks("experts", (3, 4, 5), ((head, 4),), bank_dims=1)
    assert (bank.rows, bank.cols, bank.state_shape()) == (12, 5, (3, 2))
    assert bank.group_index().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    transposed = ParamBlocks.single("experts", (3, 5, 4), BlockSpec("tensor"), bank_dims=1, transposed=True)
    assert (transposed.bank_rows, transposed.cols, transposed.state_shape()) == (4, 5, (3, 1))
    with pytest.raises(ValueError, match="segments cover 6 rows x 3 periods but the parameter has 12"):
        ParamBlocks("qkv", (12, 3), ((head, 2), (head, 2), (BlockSpec("row"), 2)), repeat=3)


def test_kind_runs_follow_v_in_order() -> None:
    """The runs of one kind in v's order, with the parameters they cover: a pattern alternates them
    per period, a single kind (a bank included) is one run, a tensor block shared by the periods
    stands where its first row is."""
    head = BlockSpec("head", 2)
    neox = ParamBlocks("qkv", (12, 3), ((head, 2), (head, 2), (BlockSpec("row"), 2)), repeat=2)
    # per period: Q and K (2 rows x 3 cols each, one block each), then V's 2 rows one block each
    assert neox.kind_runs() == [("head", 12, 2), ("row", 6, 2)] * 2
    paper = ParamBlocks("qkv", (12, 3), ((head, 2), (head, 2), (BlockSpec("tensor"), 2)), repeat=2)
    assert paper.kind_runs() == [("head", 12, 2), ("tensor", 12, 1), ("head", 12, 2)]
    bank = ParamBlocks("experts", (3, 4, 5), ((head, 4),), bank_dims=1)
    assert bank.kind_runs() == [("head", 60, 6)]
    assert ParamBlocks.single("b", (7,), BlockSpec("full")).kind_runs() == [("full", 7, 7)]
    for entry in (neox, paper, bank):
        assert sum(numel for _, numel, _ in entry.kind_runs()) == entry.numel
        assert sum(entries for _, _, entries in entry.kind_runs()) == entry.state_numel
