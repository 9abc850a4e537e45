"""``dare-lab`` with no arguments runs the embedded demo; any argument composes a normal run."""

import sys

import dare_lab.shell.cli as cli


def test_no_arguments_select_the_embedded_demo(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "hydra_main", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["dare-lab"])
    cli.main()
    assert seen == [["dare-lab", "+experiment=encoder_demo"]]
    monkeypatch.setattr(sys, "argv", ["dare-lab", "method=ties"])
    cli.main()
    assert seen[-1] == ["dare-lab", "method=ties"]


def test_embedded_default_composes(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=cli.EMBEDDED_DEFAULT)
    assert cfg.program == "dare_lab.programs.encoder_demo:run"
    assert cfg.modelpool._target_ == "dare_lab.pools.encoder_demo.demo_pool"
