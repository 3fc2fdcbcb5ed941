"""An evaluation's inputs are checked before its folder is made: a layer the model lacks, a
model shape other than the run's or a memory bank the weights lack is one line, exit 2, and
leaves no evaluations/<time> behind."""
import pytest
import torch

from and_dist import evaluate, train
from and_dist.run import checkpoint

QUIET = ["train.threads=1", "log.progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("inputs") / "run"
    assert train.main(["--config", "demo", f"run_dir={run}", "data.demo_train=40", "data.demo_test=20",
                       "train.batch_size=20", "curriculum.rounds=1", "train.epochs_per_round=1",
                       "eval.knn_k=5", "eval.every_epochs=0", *QUIET]) == 0
    return run


@pytest.mark.parametrize("args, says", [
    (["probe", "probe.layers=[nosuchlayer]"], "nosuchlayer"),
    (["all", "probe.layers=[features,nosuchlayer]"], "nosuchlayer"),
    (["knn", "model.low_dim=64"], "model.arch, model.low_dim and data.image_size stay the run's own "
                                  "(convnet_small, 128, 32 px) when evaluating a run"),
])
def test_a_bad_input_is_one_line_exit_2_and_makes_no_folder(run, capsys, args, says):
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([args[0], "--checkpoint", str(run), *args[1:], *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (run / "evaluations").exists()


def test_a_bank_the_weights_lack_is_named_before_any_folder(run, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(checkpoint.read_state(checkpoint.resolve(run))["model"], weights)   # weights only, no bank
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["knn", "--checkpoint", str(weights), f"out_dir={tmp_path}", "eval.train_features=bank",
                       "data.demo_train=40", "data.demo_test=20", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and err == ["error: eval.train_features=bank: this checkpoint holds no memory bank"]
    assert not (tmp_path / "w").exists()
