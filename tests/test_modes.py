import torch

from longtail.data.nuisance import apply_mode
from longtail.evaluation.modes import MEASURED, mode_shares, modes_in


def garment(n: int = 4) -> torch.Tensor:
    """Centred bright rectangles on a dark background, [-1, 1], the shape of a Fashion-MNIST image."""
    x = torch.full((n, 1, 32, 32), -1.0)
    x[:, :, 6:26, 9:23] = 0.9
    return x


def test_modes_follow_the_captioner_phrases():
    assert modes_in(["inverted", "faint"]) == {"invert", "low_contrast"}
    assert modes_in(["small", "shifted left", "shifted down"]) == {"corner"}
    assert modes_in(["small", "shifted left"]) == set()  # one direction is not a corner
    assert modes_in(["cut off at the top edge", "tilted right"]) == {"cutoff", "rotate"}
    assert modes_in(["large", "patterned"]) == set()


def test_shares_count_what_the_captioner_sees_in_applied_modes():
    clean = garment()
    gen = torch.Generator().manual_seed(0)
    images = torch.cat([clean, apply_mode("invert", clean, gen), apply_mode("low_contrast", clean, gen),
                        apply_mode("corner", clean, gen)])
    labels = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    shares = mode_shares(images, labels, ["clean", "inverted", "faint", "corner"])
    assert set(shares) == {"all", "clean", "inverted", "faint", "corner"} and set(shares["all"]) == set(MEASURED)
    assert shares["inverted"]["invert"] == 1.0 and shares["clean"]["invert"] == 0.0
    assert shares["faint"]["low_contrast"] == 1.0 and shares["clean"]["low_contrast"] == 0.0
    assert shares["corner"]["corner"] == 1.0 and shares["clean"]["corner"] == 0.0
    assert shares["all"]["invert"] == 0.25


class _Oracle:
    """A stand-in detector that knows each image's mode from its first pixel (set by the test)."""

    def probs(self, images):
        ids = images[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(ids, 9).float()


def test_detector_data_has_the_documented_mix_and_targets():
    from longtail.data.nuisance import MODE_NAMES
    from longtail.evaluation.modes import DETECTOR_CLASSES, detector_data

    clean = garment(160)
    images, targets = detector_data(clean, seed=0)
    assert DETECTOR_CLASSES[0] == "clean" and DETECTOR_CLASSES[1:] == MODE_NAMES
    assert torch.bincount(targets, minlength=9).tolist() == [80] + [10] * 8  # half clean, the rest evenly
    assert torch.equal(images[targets == 0], clean[targets == 0])
    assert torch.equal(images[targets == 1 + MODE_NAMES.index("invert")], -clean[targets == 1 + MODE_NAMES.index("invert")])


def test_detected_shares_count_the_detectors_calls_per_class():
    from longtail.data.nuisance import MODE_NAMES
    from longtail.evaluation.modes import detected_shares

    images = torch.zeros(8, 1, 4, 4)
    images[:, 0, 0, 0] = torch.tensor([0, 0, 0, 1, 1 + MODE_NAMES.index("blur"), 0, 0, 1], dtype=torch.float)
    shares = detected_shares(_Oracle(), images, [0, 0, 0, 0, 1, 1, 1, 1], ["a", "b"])
    assert shares["a"]["rotate"] == 0.25 and shares["b"]["rotate"] == 0.25 and shares["b"]["blur"] == 0.25
    assert shares["all"]["rotate"] == 0.25 and shares["all"]["blur"] == 0.125 and set(shares["all"]) == set(MODE_NAMES)
