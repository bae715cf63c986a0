"""A classifier that reads each tile's pixel size (resnet10t_px): it needs the size,
starts as the plain classifier, and learns to tell one texture at two scales apart."""

from __future__ import annotations

import pytest
import torch

import engine.models as M


def test_it_needs_the_pixel_size_and_starts_as_the_identity():
    torch.manual_seed(0)
    model = M.create_classifier("resnet10t_px").eval()
    x = torch.rand(2, 1, 64, 64)
    with pytest.raises(ValueError, match="pass pixel_size_nm"):
        model(x)
    plain = M.create_classifier("resnet10t").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("scale.")})
    with torch.no_grad():  # zero-initialised modulation: the plain classifier's answer at any size
        for size in (0.02, 5.0, 1400.0):
            got = model(x, pixel_size_nm=torch.full((2,), size))["material"]
            torch.testing.assert_close(got, plain(x)["material"])


def test_one_texture_at_two_scales_is_learnt_as_two_materials():
    """The same random tiles labelled material 0 at 5 nm/px and material 1 at 500 nm/px:
    no classifier that sees only pixels can beat chance; this one separates them."""
    torch.manual_seed(0)
    model = M.create_classifier("resnet10t_px", materials=["a", "b"], grades=["g"])
    x = torch.rand(16, 1, 32, 32)
    images = torch.cat([x, x])
    sizes = torch.cat([torch.full((16,), 5.0), torch.full((16,), 500.0)])
    labels = torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images, pixel_size_nm=sizes)["material"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        predicted = model(images, pixel_size_nm=sizes)["material"].argmax(1)
    assert (predicted == labels).float().mean() == 1.0
