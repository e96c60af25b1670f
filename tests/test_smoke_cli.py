from conftest import invoke, run_cli


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("init", "extract", "encode", "decode", "status", "inspect", "model"):
        assert name in result.output


def test_module_entry_point_runs():
    proc = run_cli("--version")
    assert proc.stdout.strip() == __import__("vfx").__version__
