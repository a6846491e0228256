import numpy as np
import pytest
import torch

from longtail.mining import MiningConfig, allocate, mine


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
    seen = []

    def synthesize(r, model, counts, store):
        seen.append((r, model.fc.weight.detach().clone()))
        n = sum(counts)
        store.add(np.full((n, 4, 4), r, np.uint8),
                  [{"id": f"r{r}_{i}", "class_name": "a", "round": r} for i in range(n)])

    finetuned = []

    def finetune(model, rows, r):
        finetuned.append((r, len(rows)))
        with torch.no_grad():
            model.fc.weight.add_(1.0)  # a visible change per round
        return [0.5]

    evals = []

    def evaluate(model):
        evals.append(1)
        return {"top1": float(model.fc.weight.detach().mean())}

    cfg = MiningConfig(rounds=2, images_per_round=8)
    hist = mine(tiny_cnn, synthesize, finetune, evaluate, cfg, [10, 5, 3, 1], tmp_path)
    assert [h["synthetic"] for h in hist] == [0, 8, 16]
    assert finetuned == [(1, 8), (2, 16)] and len(evals) == 3
    # round 2 generated with the classifier as round 1 left it
    assert torch.allclose(seen[1][1], seen[0][1] + 1.0)
    # a second call finds everything done: nothing generated, trained or evaluated again
    again = mine(tiny_cnn, synthesize, finetune, evaluate, cfg, [10, 5, 3, 1], tmp_path)
    assert again == hist and len(seen) == 2 and len(finetuned) == 2 and len(evals) == 3
    # one more round continues from the saved state
    cfg.rounds = 3
    more = mine(tiny_cnn, synthesize, finetune, evaluate, cfg, [10, 5, 3, 1], tmp_path)
    assert [h["synthetic"] for h in more] == [0, 8, 16, 24] and [r for r, _ in seen] == [1, 2, 3]


def test_incomplete_synthesis_is_an_error(tmp_path, tiny_cnn):
    def synthesize(r, model, counts, store):
        store.add(np.zeros((1, 4, 4), np.uint8), [{"id": "x", "class_name": "a", "round": r}])

    with pytest.raises(RuntimeError, match="expected 4 synthetic images"):
        mine(tiny_cnn, synthesize, lambda m, rows, r: [], lambda m: {}, MiningConfig(1, 4), [1, 1], tmp_path)


def test_real_only_control_never_sees_synthetic_rows(tmp_path, tiny_cnn):
    seen = []
    hist = mine(tiny_cnn, None, lambda m, rows, r: seen.append(len(rows)) or [], lambda m: {},
                MiningConfig(2, 4), [1, 1], tmp_path)
    assert seen == [0, 0] and [h["synthetic"] for h in hist] == [0, 0, 0]
