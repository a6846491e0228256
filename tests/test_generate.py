import torch

from longtail.generate import even_counts, generate, image_seed, plan_jobs
from longtail.models.tiny import caption_variants, class_prompt, load_tiny_generator
from longtail.sampling import GuidanceConfig
from longtail.testing import tiny_generator


def test_seeds_and_plans():
    assert image_seed(0, 1, 2) == image_seed(0, 1, 2) != image_seed(0, 2, 1)
    jobs = plan_jobs([2, 1], lambda c, i: f"c{c}", base_seed=3, start=[5, 0])
    assert [(j.class_id, j.index, j.prompt) for j in jobs] == [(0, 5, "c0"), (0, 6, "c0"), (1, 0, "c1")]
    assert even_counts(23, 10) == [3, 3, 3] + [2] * 7


def test_prompts():
    assert class_prompt("ankle boot") == "a photo of an ankle boot"
    assert caption_variants("a photo of a coat, dark, tilted left") == [
        "a photo of a coat, dark, tilted left", "a photo of a coat that is dark and tilted left"]
    assert caption_variants("a photo of a bag") == ["a photo of a bag"]


def test_an_image_does_not_depend_on_its_batch(tmp_path, tiny_cnn):
    ldm = load_tiny_generator(tiny_generator(tmp_path / "gen"))
    clf = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    clf(torch.zeros(1, 1, 32, 32))
    jobs = plan_jobs([2, 2, 1], lambda c, i: class_prompt(["coat", "bag", "shirt"][c]))
    kw = dict(classifier=clf, num_steps=3, cfg_scale=2.0, show=False)
    a = generate(ldm, jobs, batch_size=5, **kw)
    b = generate(ldm, jobs, batch_size=2, **kw)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert a.images.shape == (5, 1, 32, 32) and a.labels.tolist() == [0, 0, 1, 1, 2]
    g = generate(ldm, jobs, batch_size=2, guidance=GuidanceConfig("entropy", weight=5.0), **kw)
    assert g.signal.shape == (5,) and g.signal_name == "entropy" and g.nonfinite == 0
    assert not torch.allclose(g.images, a.images)
    assert all(p.requires_grad for p in clf.parameters())  # the sampler restores the classifier's state
