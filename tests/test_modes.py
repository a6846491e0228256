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
