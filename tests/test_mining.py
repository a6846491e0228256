import pytest
import torch

from longtail.generate import Generated, Job
from longtail.mining import MiningConfig, allocate, mine
from longtail.train import TrainConfig


def test_allocation_modes_sum_to_total():
    counts = [100, 50, 10]
    assert allocate(30, counts, "even") == [10, 10, 10]
    freq = allocate(32, counts, "frequency")
    inv = allocate(32, counts, "inverse")
    assert sum(freq) == sum(inv) == 32
    assert freq[0] > freq[1] > freq[2] and inv[0] < inv[1] < inv[2]
    with pytest.raises(ValueError, match="allocation"):
        allocate(10, counts, "random")


def test_mine_uses_the_current_classifier_and_resumes(tmp_path, tiny_cnn):
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 4
    seen_rounds = []

    def synthesize(r, model, counts):
        seen_rounds.append(r)
        jobs = [Job(c, i, 0, "p") for c, n in enumerate(counts) for i in range(n)]
        images = torch.rand(len(jobs), 1, 8, 8) * 2 - 1
        return Generated(images, jobs, torch.tensor([j.class_id for j in jobs]), None, None, None, None, None, 1.0)

    cfg = MiningConfig(rounds=2, images_per_round=8, finetune=TrainConfig(epochs=1, batch_size=16))
    evals = []

    def evaluate(model):
        evals.append(1)
        return {"top1": 0.5}

    def to_input(u8):
        return u8.float().unsqueeze(1) / 127.5 - 1

    names = ["a", "b", "c", "d"]
    hist = mine(tiny_cnn, x, y, synthesize, cfg, tmp_path, evaluate, names, to_input, show=False)
    assert [h["synthetic"] for h in hist] == [0, 8, 16]
    assert seen_rounds == [1, 2] and len(evals) == 3
    # a second call finds everything done: nothing generated or evaluated again, same history
    again = mine(tiny_cnn, x, y, synthesize, cfg, tmp_path, evaluate, names, to_input, show=False)
    assert again == hist and seen_rounds == [1, 2] and len(evals) == 3
    # one more round continues from the saved state
    cfg.rounds = 3
    more = mine(tiny_cnn, x, y, synthesize, cfg, tmp_path, evaluate, names, to_input, show=False)
    assert [h["synthetic"] for h in more] == [0, 8, 16, 24] and seen_rounds == [1, 2, 3]
