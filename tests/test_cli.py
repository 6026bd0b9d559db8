"""The `promptkd` command: help for every subcommand, listing models, converting and inspecting checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from promptkd.cli.main import COMMANDS, build_parser, main
from test_reference_import import ivlp_teacher_state, save_dassl


def test_entry_point_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "promptkd.cli.main", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: promptkd {command}" in out and len(out.splitlines()) > 3


def test_help_and_argument_errors_do_not_import_torch():
    """`promptkd --help`, every `promptkd CMD --help` and an argument error answer without torch, open_clip or
    timm (they cost seconds to import; benchmarks/README.md has the times)."""
    probe = (
        "import sys\n"
        "from promptkd.cli.main import COMMANDS, main\n"
        "for argv in [['--help'], *[[c, '--help'] for c in COMMANDS], ['distill', '--no-such-flag']]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'timm', 'numpy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_models_lists_tiny_models_offline(capsys):
    assert main(["models", "pkd-tiny", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "| pkd-tiny " in out and "| pkd-tiny-wide " in out and "ViT-B-16" not in out


def test_convert_then_inspect(tiny_backbone, tmp_path, capsys):
    reference = tmp_path / "model-best.pth.tar"
    save_dassl(reference, ivlp_teacher_state(tiny_backbone))
    classes = tmp_path / "classes.txt"
    classes.write_text("red star\nblue ring\ngreen cross\n")
    assert (
        main(
            [
                "convert",
                str(reference),
                "--out",
                str(tmp_path / "teacher"),
                "--model",
                "pkd-tiny",
                "--classnames",
                str(classes),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "detected promptsrc checkpoint (epoch 20)" in out
    assert "image_encoder.VPT, image_encoder.transformer.resblocks.1.VPT_shallow -> visual.prompts [2, 4, 64]" in out
    assert "ignored 2 token buffers" in out and "ignored 4 frozen CLIP tensors" in out
    assert main(["inspect", str(tmp_path / "teacher.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "method: promptsrc" in out and "classes (3): red star, blue ring, green cross" in out
    assert "| text.ctx       | [4, 64]" in out


def test_errors_are_printed_without_traceback(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["convert-weights", "--model", "ViT-B-99", "--out", str(tmp_path / "o")]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_convert_weights_writes_loadable_folder(tiny_backbone, tmp_path, capsys):
    from safetensors.torch import save_file

    from promptkd.backbones import load_backbone

    weights = tmp_path / "w.safetensors"
    save_file(dict(tiny_backbone.model.state_dict()), str(weights))
    assert main(["convert-weights", "--pretrained", str(weights), "--quick-gelu", "--out", str(tmp_path / "d")]) == 0
    assert "quick_gelu=True" in capsys.readouterr().out
    loaded = load_backbone(f"local-dir:{tmp_path / 'd'}")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(images), tiny_backbone.model.encode_image(images), atol=1e-6)
