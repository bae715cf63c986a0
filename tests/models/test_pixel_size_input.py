"""Models that read each tile's pixel size (resnet10t_px, fusion_tiny_px): they need the
size, start as their plain twins, and learn to tell one texture at two scales apart."""

from __future__ import annotations

import pytest
import torch

import engine.models as M

# (family, config that reads the pixel size, its plain twin, number of image views)
READERS = [("classifier", "resnet10t_px", "resnet10t", 1), ("fusion", "fusion_tiny_px", "fusion_tiny", 2)]


@pytest.mark.parametrize("family,name,plain_name,n_views", READERS, ids=[r[1] for r in READERS])
def test_it_needs_the_pixel_size_and_starts_as_the_identity(family, name, plain_name, n_views):
    torch.manual_seed(0)
    model = M.create_model(family, name).eval()
    views = [torch.rand(2, 1, 64, 64) for _ in range(n_views)]
    with pytest.raises(ValueError, match="pass pixel_size_nm"):
        model(*views)
    plain = M.create_model(family, plain_name).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("scale.")})
    with torch.no_grad():  # zero-initialised modulation: the plain model's answer at any size
        for size in (0.02, 5.0, 1400.0):
            got = model(*views, pixel_size_nm=torch.full((2,), size))
            for head in ("material", "grade"):
                torch.testing.assert_close(got[head], plain(*views)[head])


@pytest.mark.parametrize("family,name,plain_name,n_views", READERS, ids=[r[1] for r in READERS])
def test_one_texture_at_two_scales_is_learnt_as_two_materials(family, name, plain_name, n_views):
    """The same random tiles labelled material 0 at 5 nm/px and material 1 at 500 nm/px:
    no model that sees only pixels can beat chance; these separate them."""
    torch.manual_seed(0)
    kwargs = {"defect_classes": ["d"]} if family == "fusion" else {}
    model = M.create_model(family, name, materials=["a", "b"], grades=["g"], **kwargs)
    views = [torch.cat([x, x]) for x in (torch.rand(16, 1, 32, 32) for _ in range(n_views))]
    sizes = torch.cat([torch.full((16,), 5.0), torch.full((16,), 500.0)])
    labels = torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(*views, pixel_size_nm=sizes)["material"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        predicted = model(*views, pixel_size_nm=sizes)["material"].argmax(1)
    assert (predicted == labels).float().mean() == 1.0


def test_the_classifiers_modulation_keeps_its_checkpoint_names():
    """resnet10t_px checkpoints saved before the modulation was a module of its own load."""
    names = {k for k in M.create_model("classifier", "resnet10t_px").state_dict() if k.startswith("scale.")}
    assert names == {"scale.0.weight", "scale.0.bias", "scale.2.weight", "scale.2.bias"}
