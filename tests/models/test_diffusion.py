"""The diffusion family: a tiny UNet trains on CPU; conditioning indices; config records."""

from __future__ import annotations

import torch

import engine.models as M
from engine.models.diffusion import diffusion_loss


class TestDefectDiffusion:
    def test_tiny_unet_trains_a_few_steps(self):
        torch.manual_seed(0)
        model = M.create_diffusion("ddpm_tiny")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        # one fixed batch: a disc mask and a brighter disc in the image, three conditions
        yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        disc = (((yy - 16) ** 2 + (xx - 16) ** 2) < 64).float()
        clean = torch.stack([torch.stack([disc * 0.8 - 0.4, disc * 2 - 1])] * 4)
        cond = torch.tensor([0, 1, 2, model.num_conditions - 1])
        losses = []
        for _ in range(4):
            loss = diffusion_loss(model, clean, cond, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert all(torch.isfinite(torch.tensor(losses)))
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len(before), "every parameter moves under AdamW"
        assert 0.0 < losses[0] < 5.0  # noise prediction MSE starts near 1

    def test_loss_is_reproducible_per_generator(self):
        torch.manual_seed(0)
        model = M.create_diffusion("ddpm_tiny")
        clean = torch.zeros(2, 2, 32, 32)
        cond = torch.tensor([0, 5])
        a = diffusion_loss(model, clean, cond, generator=torch.Generator().manual_seed(3))
        b = diffusion_loss(model, clean, cond, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)

    def test_loss_is_the_mse_of_the_predicted_noise(self):
        """The same-seeded draws (noise, then timesteps) give the loss by hand."""
        torch.manual_seed(0)
        model = M.create_diffusion("ddpm_tiny")
        clean = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        cond = torch.tensor([0, 7, model.num_conditions - 1])
        loss = diffusion_loss(model, clean, cond, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        noise = torch.randn(clean.shape, generator=g)
        t = torch.randint(0, model.num_train_timesteps, (3,), generator=g)
        noisy = model.noise_scheduler().add_noise(clean, noise, t)
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(model(noisy, t, cond), noise))

    def test_a_model_that_predicts_the_added_noise_has_zero_loss(self):
        """Whatever the draws: a (DDP-style wrapped) model that recovers the noise from
        the noisy image, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, scores 0."""
        torch.manual_seed(0)
        inner = M.create_diffusion("ddpm_tiny")
        clean = torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        abar = inner.noise_scheduler().alphas_cumprod

        class Oracle(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.module = inner

            def forward(self, noisy, t, condition):
                a = abar[t].view(-1, 1, 1, 1).to(noisy.dtype)
                return (noisy - a.sqrt() * clean) / (1 - a).sqrt()

        loss = diffusion_loss(Oracle(), clean, torch.zeros(4, dtype=torch.long),
                              generator=torch.Generator().manual_seed(5))
        assert float(loss) < 1e-6

    def test_condition_index_is_one_row_per_triple(self):
        model = M.create_diffusion("ddpm_tiny")
        n_c, n_m, n_d = len(model.defect_classes), len(model.materials), len(model.modalities)
        rows = {model.condition_index(c, m, d) for c in range(n_c) for m in range(n_m) for d in range(n_d)}
        assert rows == set(range(model.num_conditions)) and model.num_conditions == 5 * 12 * 3
        assert model.unet.class_embedding.num_embeddings == model.num_conditions

    def test_config_records_vocabularies_and_pixel_sizes(self, tmp_path):
        model = M.create_diffusion("ddpm_tiny", pixel_size_nm={"SEM": 3.0})
        args = model.config.args
        assert args["defect_classes"] == list(M.defect_class_names())
        assert args["materials"] == list(M.material_names())
        assert args["modalities"] == ["SEM", "TEM", "optical"]
        path = tmp_path / "d.safetensors"
        loaded = M.load_model(path, expected_sha256=M.save_checkpoint(model, path))
        assert loaded.pixel_size_nm == {"SEM": 3.0} and loaded.modalities == ("SEM", "TEM", "optical")

    def test_config_records_the_trained_conditions(self, tmp_path):
        import pytest

        from engine.models.errors import ModelConfigError

        assert M.create_diffusion("ddpm_tiny").trained_conditions is None  # never trained: not recorded
        model = M.create_diffusion("ddpm_tiny", trained_conditions=["pore.ferritic_steel.SEM", "crack.martensite.TEM"])
        path = tmp_path / "d.safetensors"
        loaded = M.load_model(path, expected_sha256=M.save_checkpoint(model, path))
        assert loaded.trained_conditions == ("crack.martensite.TEM", "pore.ferritic_steel.SEM")
        with pytest.raises((ValueError, ModelConfigError), match="pore.granite.SEM"):
            M.create_diffusion("ddpm_tiny", trained_conditions=["pore.granite.SEM"])

    def test_builds_from_config_only(self):
        # the realistic config builds offline too (no hub id anywhere)
        model = M.create_diffusion("ddpm_64")
        assert model.sample_size == 64 and model.unet.config.in_channels == 2
