"""Small, fast configurations shared by the federated-loop tests."""

from spafl_fl import RunConfig


def tiny_config(**overrides) -> RunConfig:
    """A run that takes well under a second a round on 2 cores: synthetic data, the MLP, 4 clients."""
    values = dict(dataset="synthetic", model="mlp", clients=4, sample=2, rounds=2, local_epochs=1, batch_size=64,
                  lr=0.05, th_coeff=0.002, alpha=0.5, threads=0, seed=3)
    values.update(overrides)
    return RunConfig(**values)


def tiny_flags(rounds: int = 2) -> list[str]:
    """``spafl-fl run`` flags of ``tiny_config(rounds=rounds, measure_baseline=False)``, without --out."""
    return ["--dataset", "synthetic", "--model", "mlp", "--clients", "4", "--sample", "2", "--rounds", str(rounds),
            "--local-epochs", "1", "--batch-size", "64", "--lr", "0.05", "--alpha", "0.5", "--seed", "3",
            "--no-baseline", "--no-progress"]


def usage_error(capsys, argv: list[str]) -> str:
    """``spafl-fl ARGV``'s stderr, after checking that it was a usage error (exit 2) without a traceback."""
    import pytest

    from spafl_fl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err
