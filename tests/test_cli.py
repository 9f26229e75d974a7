"""Tests of the ``lowmem`` command: estimate (Table 1, JSON), plan, config.json input, bad input."""

import json
import subprocess
import sys

import pytest

from lightning_lowmem.cli import collapse_layers, main
from lightning_lowmem.models.known import KNOWN_MODELS, build_meta_model
from lightning_lowmem.partition import build_plan

# The Hugging Face config.json of meta-llama/Llama-2-7b-hf (fields that matter; written out, not downloaded).
LLAMA2_7B_HF = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16",
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, list[str]]:
    """``label -> [state GB, bytes/param, saving]`` from the estimate table."""
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 3)
        if len(parts) == 4 and parts[0].startswith(("AdamW", "AdamMini", "Eve", "MicroAdam")):
            rows[parts[0].strip()] = parts[1:]
    return rows


@pytest.mark.parametrize(
    ("name", "adamw", "mini", "paper"),
    [
        ("gpt2-xl", "12.46", "6.56", "AdamW 12.48 GB -> Adam-mini 6.56 GB (47.4%)"),
        ("tinyllama-1b", "8.80", "4.92", "AdamW 8.80 GB -> Adam-mini 4.92 GB (44.10%)"),
        ("llama2-7b", "53.91", "28.00", "AdamW 53.92 GB -> Adam-mini 28.04 GB (48.04%)"),
    ],
)
def test_estimate_table1_models(capsys, name, adamw, mini, paper):
    code, out, err = run(capsys, "estimate", name)
    assert code == 0 and err == ""
    rows = table_rows(out)
    assert list(rows) == [
        "AdamW", "AdamMini (adam_mini)", "AdamMini (adam_mini_paper)", "Eve", "AdamMini (adam_mini, bf16 m)",
        "AdamMini (adam_mini, int8 m)", "AdamMini (adam_mini, int4 m)", "MicroAdam (window 10, density 0.01)",
    ]
    assert rows["AdamW"] == [adamw, "8.000", "-"]
    assert rows["AdamMini (adam_mini_paper)"][0] == mini
    assert "Adam-mini paper, Table 1" in out and paper in out
    assert "The paper's arithmetic" in out


def test_estimate_llama2_7b_output(capsys):
    code, out, _ = run(capsys, "estimate", "llama2-7b")
    assert code == 0
    assert out.startswith("llama2-7b: Llama: 32 layers, width 4096, MLP 11008, 32 heads / 32 KV heads of 128")
    assert "6,738,415,616 parameters" in out
    rows = table_rows(out)
    assert rows["AdamMini (adam_mini_paper)"] == ["28.00", "4.156", "48.05%"]
    assert float(rows["MicroAdam (window 10, density 0.01)"][1]) <= 1.0
    assert "28.01 GB (AdamW as printed; the paper prints 28.04 for Adam-mini)" in out.replace("\n    ", " ")


def test_estimate_without_paper_note(capsys):
    code, out, _ = run(capsys, "estimate", "gpt2")
    assert code == 0 and "124,439,808 parameters" in out and "Table 1" not in out
    assert table_rows(out)["AdamW"][0] == "1.00"


def test_estimate_json(capsys):
    code, out, err = run(capsys, "estimate", "llama2-7b", "--format", "json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["model"] == "llama2-7b" and data["architecture"] == "llama"
    assert data["num_params"] == 6_738_415_616 and data["state_dtype"] == "float32" and data["bytes_per_gb"] == 10**9
    assert data["config"]["num_hidden_layers"] == 32 and data["config"]["head_dim"] == 128
    labels = [e["label"] for e in data["estimates"]]
    assert labels[0] == "AdamW" and "AdamMini (adam_mini_paper)" in labels
    adamw = data["estimates"][0]
    assert adamw["state_bytes"] == 8 * 6_738_415_616 and adamw["state_gb"] == pytest.approx(53.907, abs=1e-3)
    paper = data["paper_table1"]
    assert (paper["model"], paper["adamw_gb"], paper["adam_mini_gb"]) == ("Llama2-7B", 53.92, 28.04)
    assert paper["paper_arithmetic_gb"]["adam_mini"] == pytest.approx(28.0086, abs=1e-4)
    assert paper["note"][0].startswith("Adam-mini paper, Table 1 (Llama2-7B")
    code, out, _ = run(capsys, "estimate", "gpt2", "--format", "json")
    assert code == 0 and json.loads(out)["paper_table1"] is None and json.loads(out)["architecture"] == "gpt2"


def test_plan_gpt2_shows_head_blocks_for_c_attn(capsys):
    code, out, err = run(capsys, "plan", "gpt2")
    assert code == 0 and err == ""
    assert "Block plan (adam_mini): 148 tensors" in out
    line = next(line for line in out.splitlines() if "c_attn.weight" in line)
    assert line.startswith("transformer.h.{0-11}.attn.c_attn.weight")
    assert "[2304, 768]" in line and "qkv" in line and "head:64x768 | head:64x768 | rowx768" in line
    assert "(tied: lm_head.weight)" in out


def test_plan_preset_and_details(capsys):
    code, out, _ = run(capsys, "plan", "gpt2", "--preset", "adam_mini_paper", "--details")
    assert code == 0 and "Block plan (adam_mini_paper)" in out
    c_attn = [line for line in out.splitlines() if ".attn.c_attn.weight" in line]
    assert len(c_attn) == 12 and c_attn[0].startswith("transformer.h.0.attn.c_attn.weight")
    assert all("head:64x768 | head:64x768 | tensorx768" in line for line in c_attn)
    code, out, _ = run(capsys, "plan", "llama2-70b", "--preset", "eve")
    k_proj = next(line for line in out.splitlines() if "k_proj" in line)
    assert k_proj.split()[:3] == ["model.layers.{0-79}.self_attn.k_proj.weight", "[1024,", "8192]"]
    assert k_proj.split()[-1] == "row"


def test_collapse_layers_keeps_layers_laid_out_differently_apart():
    plan = build_plan(build_meta_model("gpt2"), "adam_mini", rules={r"h\.(3|7|8)\.attn\.c_attn\.weight": "full"})
    lines = [line for line in collapse_layers(plan) if "c_attn.weight" in line]
    assert [line.split("  ")[0] for line in lines] == [
        "transformer.h.{0-2,4-6,9-11}.attn.c_attn.weight", "transformer.h.{3,7-8}.attn.c_attn.weight",
    ]


def test_config_json_paths(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B_HF))
    code, out, _ = run(capsys, "estimate", str(path))
    assert code == 0 and "6,738,415,616 parameters" in out
    assert "Adam-mini paper, Table 1 (Llama2-7B" in out  # recognised by its parameter shapes
    code, out, _ = run(capsys, "plan", str(tmp_path))  # the directory holding config.json
    assert code == 0 and "model.layers.{0-31}.self_attn.q_proj.weight" in out

    gpt2 = tmp_path / "gpt2-tiny.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 100,
                                "n_positions": 32}))
    code, out, _ = run(capsys, "estimate", str(gpt2), "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["config"]["block_size"] == 32 and data["config"]["tie_weights"] is True
    assert data["num_params"] == sum(p.numel() for p in build_meta_model(str(gpt2)).parameters())

    gqa = tmp_path / "mistral.json"
    gqa.write_text(json.dumps({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 32, "vocab_size": 100, "tie_word_embeddings": True}))
    code, out, _ = run(capsys, "plan", str(gqa))
    k_proj = next(line for line in out.splitlines() if "k_proj" in line)
    assert code == 0 and "[64, 64]" in k_proj and k_proj.split()[-1] == "head:32"
    assert "(tied: lm_head.weight)" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such config file"),
        ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"hidden_size": 8}', "has no 'model_type'; supported model types: any transformers knows, and gpt2, llama, "
         "mistral without transformers"),
        ('{"model_type": "no_such_family"}',
         "model_type 'no_such_family' is not one the installed transformers"),
        ('{"model_type": "llama", "hidden_size": 64}', "has no 'vocab_size', which a llama config needs"),
        ('{"model_type": "gpt2", "n_layer": 2, "n_head": 3, "n_embd": 64, "vocab_size": 10}',
         "n_embd (64) must be divisible by n_head (3)"),
        ('{"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 10, "n_inner": 100}',
         "n_inner=100, but this package's GPT has an MLP of 4 * n_embd = 256"),
        ('{"model_type": "llama", "vocab_size": 10, "hidden_size": "64", "intermediate_size": 8, '
         '"num_hidden_layers": 1, "num_attention_heads": 4}',
         "LlamaConfig.hidden_size must be a positive int, got '64'"),
    ],
)
def test_bad_config_files_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    for command in ("estimate", "plan"):
        code, out, err = run(capsys, command, str(path))
        assert code == 2 and out == ""
        assert err.startswith(f"lowmem {command}: error: ") and message in err
        assert str(path) in err


# A Mixtral-8x7B-shaped and a tiny GPT-NeoX config.json (fields as in the published files).
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False}
NEOX_TINY = {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 100, "rotary_pct": 0.25}


def test_plan_of_a_mixtral_config_json_per_expert_rows(capsys, tmp_path):
    """Each expert's [out, in] matrix keeps one value per output row: 8 experts x 2 * 14336 rows of
    gate_up_proj, 8 x 4096 of down_proj, and the router one per expert."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MIXTRAL_8X7B))
    code, out, err = run(capsys, "plan", str(path))
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("model.")}
    assert " ".join(lines["model.layers.{0-31}.mlp.experts.gate_up_proj"].split()[-6:]) == "mlp row per slice of [8]"
    assert "[8, 28672, 4096]" in lines["model.layers.{0-31}.mlp.experts.gate_up_proj"]
    assert lines["model.layers.{0-31}.mlp.gate.weight"].split()[-1] == "row"
    code, out, _ = run(capsys, "estimate", str(path), "--format", "json")
    data = json.loads(out)
    assert data["architecture"] == "mixtral" and data["num_params"] == 46_702_792_704
    adam_mini = next(row for row in data["estimates"] if row["label"] == "AdamMini (adam_mini)")
    # v entries: per layer 8 * (28672 + 4096) expert rows + 8 router rows + 32 + 8 Q/K heads + 1024 + 4096 rows
    # + 2 norms; embedding and head 32000 rows each, final norm 1.
    per_layer = 8 * (28672 + 4096) + 8 + 32 + 8 + 1024 + 4096 + 2
    v = 32 * per_layer + 2 * 32000 + 1
    assert adam_mini["state_bytes"] == 4 * (46_702_792_704 + v)


def test_plan_of_a_gpt_neox_config_json_by_head(capsys, tmp_path):
    """query_key_value is [heads, 3, head_dim]: per head Q (16 rows), K (16 rows), V rows."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(NEOX_TINY))
    code, out, err = run(capsys, "plan", str(path), "--preset", "adam_mini_paper")
    assert code == 0, err
    qkv = next(line for line in out.splitlines() if "query_key_value.weight" in line)
    assert qkv.split("qkv", 1)[1].strip() == "[head:16x16 | head:16x16 | tensorx16] x4"


def test_unknown_name_exits_2_listing_known_names(capsys):
    code, out, err = run(capsys, "estimate", "llama-7b")
    assert code == 2 and out == ""
    assert "Unknown model 'llama-7b'. Known models: " + ", ".join(KNOWN_MODELS) in err


def test_names_are_case_insensitive(capsys):
    assert run(capsys, "estimate", "Llama2-7B")[0] == 0


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "plan", "gpt2", "--preset", "nope")
    assert code == 2 and "invalid choice: 'nope'" in err
    code, _, err = run(capsys, "estimate")
    assert code == 2 and "the following arguments are required: MODEL" in err
    assert run(capsys)[0] == 2
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "estimate" in out and "plan" in out


def _run_module(*argv):
    return subprocess.run([sys.executable, "-m", "lightning_lowmem.cli", *argv], capture_output=True, text=True,
                          timeout=120)


def test_module_entry_point_runs_as_a_script():
    done = _run_module("estimate", "gpt2-xl", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["paper_table1"]["model"] == "GPT2-1.5B"
    done = _run_module("plan", "no-such-model")
    assert done.returncode == 2 and "Unknown model 'no-such-model'" in done.stderr and done.stdout == ""


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = entry_points(group="console_scripts", name="lowmem")
    if not scripts:
        pytest.skip("the package is not installed; the entry point is only declared in pyproject.toml")
    assert next(iter(scripts)).value == "lightning_lowmem.cli:main"
