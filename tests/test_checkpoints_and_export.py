"""Checkpoints and export: the checkpoints kept and their cadence, scream_config.json, the model card,
and --export_ctranslate2 checked at start-up. (The export loading in transformers with our logits: the
smoke test; CTranslate2 exports of real weights: test_real_weights.py.)"""

import json
import sys

import run_scream as rs
from tests.support import GLOBAL_BATCH, NUM_STEPS, PEAK_LR, SAVE_LIMIT, assert_config_error, eval_lines


def test_checkpoints_config_and_model_card(train_straight):
    straight, _ = train_straight
    # Saved at 2, 4 and 6; --save_total_limit 2 keeps the last two, each complete.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["4", "6"]
    for step in ("4", "6"):
        assert (straight / "checkpoints" / step / "state").is_dir() and (
            straight / "checkpoints" / step / "meta"
        ).is_dir()
        assert not list((straight / "checkpoints").glob(f"{step}.*tmp*"))
    config = json.loads((straight / "scream_config.json").read_text())
    resolved = config["resolved"]
    assert resolved["devices"] == 8 and resolved["hosts"] == 1 and resolved["mesh"] == {"data": 8, "fsdp": 1}
    assert (resolved["global_batch"], resolved["per_device_batch"], resolved["eval_batch"]) == (8, 1, 8)
    assert resolved["effective_learning_rate"] == PEAK_LR
    assert resolved["total_train_examples"] == GLOBAL_BATCH * NUM_STEPS
    assert config["training"]["num_train_steps"] == NUM_STEPS and config["training"]["save_total_limit"] == SAVE_LIMIT
    card = (straight / "README.md").read_text()
    (final,) = eval_lines(straight)
    for key in ("eval/loss", "eval/wer", "eval/cer", "eval/wer_normalized"):
        assert f"- {key}: {final[key]:.4g}" in card
    assert '"num_train_steps": 6' in card


def test_checkpoints_have_a_cadence_by_default():
    """Every --eval_steps with --do_eval; otherwise every DEFAULT_SAVE_STEPS, never only at the end."""
    args = rs.TrainingArguments(output_dir="x", num_train_steps=50_000)
    assert args.save_steps == rs.DEFAULT_SAVE_STEPS == 1000
    assert rs.TrainingArguments(output_dir="x", num_train_steps=50_000, do_eval=True).save_steps == 1000
    assert rs.TrainingArguments(output_dir="x", num_train_steps=50_000, do_eval=True, eval_steps=250).save_steps == 250
    assert rs.TrainingArguments(output_dir="x", num_train_steps=50_000, eval_steps=250).save_steps == 1000
    assert rs.TrainingArguments(output_dir="x", eval_steps=250, save_steps=70).save_steps == 70


def test_export_ctranslate2_flag_is_checked_at_start_up(monkeypatch, capsys, tmp_path):
    """A wrong quantization, or ctranslate2 missing, is one paragraph and exit 2 before anything loads."""
    flags = ["--config_name", str(tmp_path / "unread"), "--do_train", "--output_dir", str(tmp_path / "out")]
    assert rs.main(flags + ["--export_ctranslate2", "int4"]) == 2
    assert_config_error(2, capsys.readouterr().err, "--export_ctranslate2 'int4'", "int8_float16", "float16")
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed
    assert rs.main(flags + ["--export_ctranslate2", "int8"]) == 2
    assert_config_error(2, capsys.readouterr().err, "--export_ctranslate2 needs ctranslate2", "pip install")
