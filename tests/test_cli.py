"""The `routelab` command's small subcommands: clear one-line errors, exit code 2."""

from routelab.cli import main


def test_demo_errors_are_one_clear_line(capsys):
    assert main(["demo", "--router", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("routelab demo: error: unknown router 'nope'; valid names:") and "\n" not in err
    assert main(["demo", "--k", "20"]) == 2
    assert "k must be an integer in [1, num_experts=8]" in capsys.readouterr().err


def test_demo_runs_a_router_that_needs_token_ids(capsys):
    assert main(["demo", "--router", "hash", "--steps", "2"]) == 0
    assert "mean experts per token: 1.00" in capsys.readouterr().out
