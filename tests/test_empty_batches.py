"""vitconvert.layers.empty_batches: timm's blocks on a batch of no images, eager and exported."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch

from vitconvert.layers.empty_batches import empty_batch_safe, roll_by_slices, rowwise_shape

# timm architectures whose own code refuses a batch of 0 (a -1 beside the batch size, or a roll under torch.export):
# name, tiny settings, input size
REFUSING: dict[str, tuple[str, dict[str, object], int]] = {
    "pvt_v2": ("pvt_v2_b0", {"embed_dims": (16, 32, 40, 64), "num_heads": (1, 2, 2, 4), "depths": (1, 1, 1, 1)}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 56, "embed_dim": 24, "depths": (1, 1), "num_heads": (1, 2)},
             56),
    "swinv2": ("swinv2_tiny_window8_256", {"img_size": 64, "embed_dim": 24, "depths": (1, 1), "num_heads": (1, 2)},
               64),
    "beit": ("beit_base_patch16_224", {"img_size": 32, "embed_dim": 24, "depth": 1, "num_heads": 2}, 32),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28, "embed_dim": 24, "depth": 1, "num_heads": 2}, 28),
}


def _tiny(arch: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny model and three images of its input size."""
    name, kwargs, size = REFUSING[arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    return model, torch.randn(3, 3, size, size)


@pytest.mark.parametrize("arch", sorted(REFUSING))
def test_timm_blocks_run_on_no_images_and_give_the_same_answers_otherwise(arch: str) -> None:
    model, x = _tiny(arch)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="ambiguous"):  # timm's own code, so the context is what makes it run
            model(x[:0])
        ref = model(x)
        with empty_batch_safe():
            empty, got = model(x[:0]), model(x)
    assert empty.shape == (0, 5)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("arch", ["pvt_v2", "swin"])
def test_exported_blocks_run_on_a_batch_that_may_be_empty(arch: str) -> None:
    """torch.export with a batch whose size may be 0 (an unbacked size: a cascade's sub-batch): without the context
    the program asserts at run time that the batch is not empty; with it, it runs batches of 0, 1 and 3 as eager
    does."""
    model, x = _tiny(arch)

    class Later(torch.nn.Module):  # a later stage: the rows whose first pixel is positive, a run-time count
        def __init__(self, safe: bool = True) -> None:
            super().__init__()
            self.model, self.safe = model, safe

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = (x[:, 0, 0, 0] > 0).nonzero().squeeze(1)
            with empty_batch_safe() if self.safe else contextlib.nullcontext():
                return self.model(x.index_select(0, rows))

    batch = torch.export.Dim("batch", min=1, max=64)
    unsafe = torch.export.export(Later(safe=False), (x,), dynamic_shapes=({0: batch},), strict=False)
    with pytest.raises(RuntimeError, match="Ne\\(u0, 0\\)"):  # timm's code traced as it is asserts the rows are not 0
        unsafe.module()(-x.abs())
    program = torch.export.export(Later(), (x,), dynamic_shapes=({0: batch},), strict=False)
    for sign in (-1.0, 1.0):
        for n in (1, 3):
            xs = x[:n].clone()
            xs[:, 0, 0, 0] = sign
            with torch.no_grad():
                got, ref = program.module()(xs), Later()(xs)
            assert got.shape == ((n if sign > 0 else 0), 5)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("shape", "target", "spelled"), [
    ((0, 49, 72), (0, 49, 3, 3, -1), [0, 49, 3, 3, 8]),
    ((2, 49, 72), (2, 49, 3, 3, -1), [2, 49, 3, 3, 8]),
    ((2, 16, 4, 4), (2, -1, 16), [2, 16, 16]),
    ((6, 7, 7, 8), (-1, 49, 8), None),  # -1 at the batch position: PyTorch decides it (0 on an empty batch)
    ((6, 7, 7, 8), (3, -1, 8), None),  # not a reshape of rows
    ((6, 7), (6, 7), None),  # no -1
])
def test_rowwise_shape_spells_out_the_minus_one_only_for_reshapes_of_rows(
        shape: tuple[int, ...], target: tuple[int, ...], spelled: list[int] | None) -> None:
    assert rowwise_shape(torch.empty(shape), target) == spelled


@pytest.mark.parametrize(("shifts", "dims"), [((-3, -3), (1, 2)), ((3, 3), (1, 2)), (2, 1), ((0, 7), (1, 2)), (9, 2)])
def test_roll_by_slices_is_torch_roll(shifts: int | tuple[int, int], dims: int | tuple[int, int]) -> None:
    x = torch.randn(2, 7, 7, 3)
    got = roll_by_slices(x, shifts, dims)
    assert got is not None and torch.equal(got, torch.roll(x, shifts, dims)) and got.data_ptr() != x.data_ptr()
    assert roll_by_slices(x, 1) is None  # no dims: a roll of the flattened tensor, left to torch
