"""The mask segmentor's classification on the tiny CLIP against FC-CLIP's inference written out
(bytedance/fc-clip@2b0bbe2 `FCCLIP.forward`, `MaskPooling`, `get_classification_logits`): max over synonym
logits, pooling over binarised masks, the void-free ensemble and ENSEMBLE_ON_VALID_MASK."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from tests.test_mask_inference import fcclip_ensemble
from tests.tiny_mask import tiny_mask_cfg

VOCAB = "red circle|ball|disc,green square,sky|heaven"
TRAIN_VOCAB = "red circle,green square|box"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY=VOCAB, MODEL__MASK_SEG__TRAIN_VOCABULARY=TRAIN_VOCAB,
                        MODEL__MASK_SEG__CLASSIFIER__ENSEMBLE_ON_VALID_MASK=True)
    return build_model(cfg).eval()


def _outputs(model):
    torch.manual_seed(1)
    images = model.preprocess([{"image": torch.rand(3, 64, 80) * 255}])
    with torch.no_grad():
        feats = model.encode(images.tensor)
        out = model.transformer_decoder(*reversed(model.pixel_decoder(feats)))
    logits = out["pred_masks"].float()
    logits[0, :3] = -4.0  # three queries with empty masks: in-vocabulary classifier alone
    return images, feats["clip_dense"], out["pred_embeds"], logits


def fcclip_probs(model, embeds, mask_logits, dense):
    """FC-CLIP's rule with the model's weights: one text row per synonym, logits maxed per class."""
    rows, owner = model.text_classifier.synonym_embeddings(model.vocabulary)
    classes = [[s for s in range(len(owner)) if owner[s] == c] for c in range(len(model.vocabulary))]

    def per_class(logits):
        return torch.stack([logits[..., s].max(-1).values for s in classes], dim=-1)

    void = F.normalize(model.in_vocab.void_embedding, dim=-1)
    cos = F.normalize(embeds, dim=-1) @ torch.cat([rows, void]).t()
    in_logits = model.in_vocab.scale * torch.cat([per_class(cos[..., :-1]), cos[..., -1:]], dim=-1)
    grid = F.interpolate(mask_logits, size=dense.shape[-2:], mode="bilinear", align_corners=False)
    binary = (grid > 0).float()
    pooled = torch.einsum("bchw,bqhw->bqc", dense, binary / (binary.sum((-1, -2), keepdim=True) + 1e-8))
    out_logits = per_class(100.0 * F.normalize(pooled, dim=-1) @ rows.t())
    valid = (binary.sum((-1, -2)) > 0).float()
    return fcclip_ensemble(in_logits.float(), out_logits, model.seen, 0.4, 0.8, valid), valid


def test_class_probabilities_equal_fcclip(model):
    images, dense, embeds, logits = _outputs(model)
    with torch.no_grad():
        ref, valid = fcclip_probs(model, embeds, logits, dense)
        probs = model.class_probabilities(embeds, logits, dense, images, model.text_embeddings(model.vocabulary))
    assert (valid == 0).sum() >= 3 and (valid == 1).sum() > 0
    assert model.seen.tolist() == [True, True, False]  # "sky" is no training class: both weights in play
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-6)


def test_synonym_rule_in_training_and_inference(model):
    text = model.text_embeddings(model.vocabulary)
    assert text.embeds.shape[0] == 6 and text.owner.tolist() == [0, 0, 0, 1, 2, 2]
    train = model.text_embeddings(model.train_vocabulary)  # what `losses` classifies against
    assert train.embeds.shape[0] == 3 and train.num_classes == 2
    model.synonyms = "mean"
    try:
        mean = model.text_embeddings(model.vocabulary)
        assert mean.owner is None and mean.embeds.shape[0] == 3
        torch.testing.assert_close(mean.embeds, model.text_classifier(model.vocabulary))
    finally:
        model.synonyms = "max"


def test_soft_pooling_and_no_valid_rule_are_config_keys():
    torch.manual_seed(0)
    cfg = tiny_mask_cfg(MODEL__TEXT__VOCABULARY=VOCAB, MODEL__MASK_SEG__TRAIN_VOCABULARY=TRAIN_VOCAB,
                        MODEL__MASK_SEG__CLASSIFIER__SOFT_MASK_POOLING=True,
                        MODEL__MASK_SEG__CLASSIFIER__SYNONYMS="mean")
    soft = build_model(cfg).eval()
    assert soft.soft_mask_pooling and soft.synonyms == "mean" and not soft.ensemble_on_valid_mask
    images, dense, embeds, logits = _outputs(soft)
    with torch.no_grad():
        probs = soft.class_probabilities(embeds, logits, dense, images, soft.text_embeddings(soft.vocabulary))
        ref, _ = fcclip_probs(soft, embeds, logits, dense)
    assert probs.shape == ref.shape and not torch.allclose(probs, ref, atol=1e-4)
    with pytest.raises(ValueError, match="SYNONYMS"):
        build_model(tiny_mask_cfg(MODEL__TEXT__VOCABULARY=VOCAB, MODEL__MASK_SEG__CLASSIFIER__SYNONYMS="min"))
