import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from instret import augment as A


def smooth_images(n, size=32, seed=0):
    """Random colourful images with some spatial structure, uint8."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def crop_box_loop(u_area, u_ratio, u_pos, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, written per sample with given uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for a in range(len(u_area)):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u_area[a]))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u_ratio[a]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = math.floor(float(u_pos[0]) * (height - h + 1))
            left = math.floor(float(u_pos[1]) * (width - w + 1))
            return [top, left, h, w]
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize("hw,scale", [((32, 32), (0.2, 1.0)), ((20, 50), (0.2, 1.0)), ((32, 32), (0.9, 1.0))])
def test_crop_boxes_equal_per_sample_reference(hw, scale):
    g = torch.Generator().manual_seed(1)
    n = 400
    ua, ur, up = (
        torch.rand(n, 10, generator=g, dtype=torch.float64),
        torch.rand(n, 10, generator=g, dtype=torch.float64),
        torch.rand(n, 2, generator=g, dtype=torch.float64),
    )
    boxes = A.crop_boxes(ua, ur, up, *hw, scale, (3 / 4, 4 / 3))
    for i in range(n):
        assert boxes[i].long().tolist() == crop_box_loop(ua[i], ur[i], up[i], *hw, scale, (3 / 4, 4 / 3))


def test_crop_box_distribution_matches_torchvision():
    torch.manual_seed(0)
    tv = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(0)
    ours = A.crop_boxes(
        torch.rand(4000, 10, generator=g),
        torch.rand(4000, 10, generator=g),
        torch.rand(4000, 2, generator=g),
        32,
        32,
        (0.2, 1.0),
        (3 / 4, 4 / 3),
    ).double()
    for boxes in (tv, ours):  # every box inside the image, area fraction inside the range (+ rounding)
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    frac_tv, frac_ours = tv[:, 2] * tv[:, 3] / 1024, ours[:, 2] * ours[:, 3] / 1024
    assert abs(frac_tv.mean() - frac_ours.mean()) < 0.02
    assert abs(frac_tv.std() - frac_ours.std()) < 0.02
    ratio_tv, ratio_ours = (tv[:, 3] / tv[:, 2]).log(), (ours[:, 3] / ours[:, 2]).log()
    assert abs(ratio_tv.mean() - ratio_ours.mean()) < 0.02


def test_crop_resize_flip_equals_torchvision_resized_crop():
    x = smooth_images(6, 32).float() / 255
    boxes = torch.tensor(
        [[0, 0, 32, 32], [4, 6, 20, 14], [10, 0, 22, 30], [3, 3, 9, 12], [0, 16, 16, 16], [5, 5, 27, 27]],
        dtype=torch.float32,
    )
    flip = torch.tensor([False, True, False, True, False, True])
    ours = A.crop_resize_flip(x, boxes, flip, 32)
    for i in range(6):
        top, left, h, w = boxes[i].long().tolist()
        ref = TF.resized_crop(x[i], top, left, h, w, [32, 32], antialias=False)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        # Inside the box the two agree; at its border grid_sample may blend in the next pixel.
        assert torch.allclose(ours[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-4)


@pytest.mark.parametrize(
    "op,tv_op,factor",
    [
        (A.adjust_brightness, TF.adjust_brightness, 1.3),
        (A.adjust_contrast, TF.adjust_contrast, 0.7),
        (A.adjust_saturation, TF.adjust_saturation, 1.4),
        (A.adjust_hue, TF.adjust_hue, 0.3),
        (A.adjust_hue, TF.adjust_hue, -0.45),
    ],
)
def test_each_jitter_op_equals_torchvision(op, tv_op, factor):
    x = smooth_images(4, 16, seed=2).float() / 255
    factors = torch.tensor([factor, 1.0 if op is not A.adjust_hue else 0.0, factor / 2, factor])
    ours = op(x, factors)
    for i in range(4):
        assert torch.allclose(ours[i], tv_op(x[i], float(factors[i])), atol=1e-5)


def test_color_jitter_applies_each_samples_order():
    x = smooth_images(3, 16, seed=3).float() / 255
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.1], [0.8, 1.3, 0.6, -0.2], [1.1, 1.1, 1.4, 0.35]])
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    ours = A.color_jitter(x, factors, order)
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(3):
        ref = x[i]
        for op in order[i].tolist():
            ref = tv_ops[op](ref, float(factors[i, op]))
        assert torch.allclose(ours[i], ref, atol=1e-5)


def test_parameter_ranges():
    aug = A.Augment(32, (0.5,) * 3, (0.25,) * 3)
    p = aug.sample_params(5000, 32, 32, torch.Generator().manual_seed(4), "cpu")
    lo, hi = p.factors.min(dim=0).values, p.factors.max(dim=0).values
    assert torch.all(lo[:3] >= 0.6) and torch.all(hi[:3] <= 1.4) and lo[3] >= -0.4 and hi[3] <= 0.4
    assert torch.all(hi[:3] > 1.38) and torch.all(lo[:3] < 0.62)  # the whole range is used
    assert abs(p.gray.float().mean() - 0.2) < 0.02 and abs(p.flip.float().mean() - 0.5) < 0.03
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(5000, 4))


def test_output_statistics_match_torchvision_pipeline():
    images = smooth_images(64, 32, seed=5)
    tv = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=False),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomGrayscale(0.2),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
    torch.manual_seed(0)
    ref = torch.stack([tv(images[i % 64]) for i in range(3000)])
    aug = A.Augment(32, (0.0,) * 3, (1.0,) * 3)
    ours = aug(images.repeat(47, 1, 1, 1)[:3000], torch.Generator().manual_seed(0))
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    for stat in (
        lambda t: t.mean(dim=(0, 2, 3)),
        lambda t: t.std(dim=(0, 2, 3)),
        lambda t: t.std(dim=(1, 2, 3)).mean(),
        lambda t: (t.amax(1) - t.amin(1)).mean(),
    ):
        assert torch.allclose(stat(ours), stat(ref), atol=0.01)


def test_same_generator_state_same_output():
    images = smooth_images(8)
    aug = A.Augment(32, (0.5,) * 3, (0.25,) * 3)
    a = aug(images, torch.Generator().manual_seed(7))
    b = aug(images, torch.Generator().manual_seed(7))
    c = aug(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_channel_stats_of_constant_images():
    images = torch.full((10, 3, 4, 4), 51, dtype=torch.uint8)
    mean, std = A.channel_stats(images.split(3))
    assert mean == (0.2, 0.2, 0.2) and std == (0.001,) * 3


def test_channel_stats_in_batches_equal_torch_over_the_whole_set():
    images = torch.randint(0, 256, (37, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.double() / 255
    mean, std = A.channel_stats(images.split(8))  # 8, 8, 8, 8, 5
    assert mean == tuple(round(float(v), 4) for v in x.mean(dim=(0, 2, 3)))
    assert std == tuple(round(float(v), 4) for v in x.std(dim=(0, 2, 3)))


def test_paint_boxes_matches_a_pixel_loop():
    x = torch.rand(3, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.5], [0.0, 0.0, 0.0, 0.0], [0.5, 0.75, 0.5, 0.25]])
    colours = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2], [0.0, 1.0, 0.0]])
    got = A.paint_boxes(x, boxes, colours)
    want = x.clone()
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        for r in range(10):
            for c in range(12):
                if top <= (r + 0.5) / 10 < top + h and left <= (c + 0.5) / 12 < left + w:
                    want[i, :, r, c] = colours[i]
    assert torch.equal(got, want)
    assert torch.equal(got[1], x[1])  # a zero-size box paints nothing


def test_a_quarter_turn_of_the_whole_image_is_rot90():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    no_flip = torch.zeros(2, dtype=torch.bool)
    turned = A.crop_resize_flip(x, box, no_flip, 8, torch.full((2,), math.pi / 2))
    assert torch.allclose(turned, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5)
    # No angle and a zero angle are the same picture.
    assert torch.allclose(
        A.crop_resize_flip(x, box, no_flip, 8, torch.zeros(2)), A.crop_resize_flip(x, box, no_flip, 8)
    )


def test_copy_edits_are_drawn_only_when_on_so_the_papers_recipe_draws_what_it_did():
    paper = A.Augment(32, (0.5,) * 3, (0.25,) * 3)
    g = torch.Generator().manual_seed(3)
    p = paper.sample_params(50, 32, 32, g, "cpu")
    assert p.angle is None and p.erase is None and p.blur is None
    edits = A.Augment(32, (0.5,) * 3, (0.25,) * 3, rotate=10, erase_p=0.5, blur_p=0.3)
    q = edits.sample_params(4000, 32, 32, torch.Generator().manual_seed(3), "cpu")
    assert q.angle.abs().max() <= math.radians(10) and q.angle.abs().max() > math.radians(9.5)
    painted = q.erase[:, 2] > 0
    assert abs(painted.float().mean() - 0.5) < 0.03 and abs(q.blur.float().mean() - 0.3) < 0.03
    area = q.erase[painted, 2] * q.erase[painted, 3]
    assert area.min() >= 0.0199 and area.max() <= 0.1501
    assert (q.erase[:, 0] + q.erase[:, 2] <= 1 + 1e-6).all() and (q.erase[:, 1] + q.erase[:, 3] <= 1 + 1e-6).all()


def test_blur_is_a_three_by_three_mean_where_drawn():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    aug = A.Augment(
        6,
        (0.0,) * 3,
        (1.0,) * 3,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        jitter=0.0,
        grayscale_p=0.0,
        flip=False,
        blur_p=1.0,
    )
    out = aug.apply(x, aug.sample_params(2, 6, 6, torch.Generator().manual_seed(0), "cpu"))
    assert torch.allclose(out[:, :, 2, 2], x[:, :, 1:4, 1:4].mean(dim=(2, 3)), atol=1e-5)


def test_a_share_of_a_batch_gets_the_whole_batchs_draws_with_copy_edits_on():
    images = smooth_images(8)
    aug = A.Augment(32, (0.5,) * 3, (0.25,) * 3, rotate=10, erase_p=0.5, blur_p=0.5)
    whole = aug(images, torch.Generator().manual_seed(5))
    share = aug(images[2:5], torch.Generator().manual_seed(5), rows=slice(2, 5), batch=8)
    assert torch.equal(share, whole[2:5])


def test_a_step_makes_no_tensor_from_host_values_after_the_first(monkeypatch):
    """On a GPU each torch.tensor(...) is a copy from the host that waits: an augmentation step
    (every option on) and the test-time transform make none once their constants exist."""
    aug = A.Augment(16, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), rotate=10, erase_p=0.5, blur_p=0.5)
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    first = aug(images, torch.Generator().manual_seed(0))
    A.eval_transform(images, aug.mean, aug.std)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called in a step")

    monkeypatch.setattr(torch, "tensor", refuse)
    again = aug(images, torch.Generator().manual_seed(0))
    A.eval_transform(images, aug.mean, aug.std)
    assert torch.equal(first, again)  # the cached constants give the same images


def test_the_gpus_masked_colour_jitter_equals_the_row_wise_one(monkeypatch):
    """The GPU branch (the whole batch at every step: no host sync) run on the CPU against the
    CPU branch (each op on the rows that chose it): the same images, with one hue shift (a
    round trip through HSV) for the batch where it took four."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(64, 3, 12, 12, generator=g)
    params = A.Augment(12, (0.5,) * 3, (0.2,) * 3).sample_params(64, 12, 12, g, "cpu")
    assert {order.index(A.HUE) for order in params.order.tolist()} == {0, 1, 2, 3}  # the hue at every stage
    rows = A.color_jitter(x, params.factors, params.order, masked=False)
    hsv_trips = []
    monkeypatch.setattr(A, "rgb_to_hsv", lambda t, f=A.rgb_to_hsv: hsv_trips.append(len(t)) or f(t))
    masked = A.color_jitter(x, params.factors, params.order, masked=True)
    assert not torch.allclose(rows, x, atol=1e-3)  # the jitter did something
    assert torch.equal(masked, rows)
    assert hsv_trips == [64]
