"""``model.pretrained=torchvision`` with COCO's 80 classes keeps torchvision's classifier, each
label taking the row of its COCO category id (torchvision indexes rows by category id)."""

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_Weights,
    SSD300_VGG16_Weights,
    ssd300_vgg16,
)

from detkit.config import compose_config
from detkit.models.convert import coco_classifier_rows

# COCO 2017's category ids (from its annotation files, not from torchvision): 1..90 without
# the ten ids no category uses. detkit's COCO loader gives label l to the l-th of them.
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_IDS = [i for i in range(1, 91) if i not in COCO_UNUSED_IDS]


@pytest.mark.parametrize("weights", [SSD300_VGG16_Weights, FasterRCNN_ResNet50_FPN_Weights])
def test_coco_classifier_rows_follow_the_category_ids(weights):
    categories = weights.DEFAULT.meta["categories"]  # metadata only: nothing is downloaded
    assert len(COCO_IDS) == 80
    assert coco_classifier_rows(91, 80, categories) == [0, *COCO_IDS]
    assert coco_classifier_rows(91, 90, categories) == list(range(91))  # torchvision's own
    assert coco_classifier_rows(91, 20, categories) is None  # no row is ours


def _coco_stand_in():
    """A torchvision ssd300_vgg16 with random weights in place of the COCO ones (91 rows)."""
    coco = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).eval()
    unused = sorted(COCO_UNUSED_IDS)
    with torch.no_grad():
        for conv in coco.head.classification_head.module_list:
            # Spread class scores so each image has confident, distinct detections; shrink the
            # rest so the softmax does not saturate (ties would order arbitrarily).
            conv.weight.mul_(0.05)
            bias = conv.bias.view(-1, 91)
            bias.copy_(torch.randn(bias.shape[1]) * 0.5)
            # As in the COCO weights, the unused ids are never a training target: they never
            # score, so the softmax over our 81 rows equals torchvision's over 91.
            conv.weight.view(-1, 91, *conv.weight.shape[1:])[:, unused] = 0.0
            bias[:, unused] = -1.0e4
        for conv in coco.head.regression_head.module_list:
            conv.weight.mul_(0.02)
    return coco


@torch.no_grad()
def test_pretrained_torchvision_with_cocos_80_classes_gives_torchvisions_detections(monkeypatch):
    import torchvision.models.detection as tv_detection

    coco = _coco_stand_in()
    monkeypatch.setattr(tv_detection, "ssd300_vgg16", lambda weights: coco)  # no download
    cfg = compose_config(
        "train", ["model=ssd300_vgg16", "data=coco", "model.pretrained=torchvision"]
    )
    assert cfg.data.num_classes == 80
    ours = instantiate(cfg.model).eval()
    images = torch.rand(2, 3, 300, 300)
    expected = coco(list(images))
    got = ours(images).detections
    for e, g in zip(expected, got, strict=True):
        assert len(e["boxes"]) == len(g["boxes"]) > 0
        assert len(set(e["labels"].tolist())) >= 3  # several classes: the row order matters
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"])
        # our label l <-> COCO category id COCO_IDS[l] = torchvision's label
        assert [COCO_IDS[label] for label in g["labels"].tolist()] == e["labels"].tolist()
