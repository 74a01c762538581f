"""Stage I's contrastive objective against SEED's own statement of it (torch), and the
causal query it reads."""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import TINY_TOKENIZER
from seed_jax.models.tokenizer import SeedTokenizer, l2_normalize
from seed_jax.trainers.tokenizer import contrastive_loss


def _reference_itc(image, text, temperature, label_smoothing):
    """SEED's stage-I ITC (Blip2QformerCasual.forward) on one process: F.normalize'd
    features, logits / temp, F.cross_entropy with label smoothing both ways, averaged.
    image, text (B,F) torch tensors; temperature a 0-d torch tensor."""
    import torch
    import torch.nn.functional as F

    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    targets = torch.arange(image.shape[0])
    return (F.cross_entropy(image @ text.T / temperature, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(text @ image.T / temperature, targets, label_smoothing=label_smoothing)) / 2


def _lavis_distributed_itc(image, text, temperature, label_smoothing, ranks: int):
    """SEED's stage-I ITC as it trained (torch.distributed over `ranks` processes): each
    rank scores its own rows against every rank's features, gathered by LAVIS's
    concat_all_gather, which carries no gradient; DDP averages the ranks' gradients
    (here: the mean of their losses)."""
    import torch
    import torch.nn.functional as F

    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image_all, text_all = image.detach(), text.detach()
    rows = image.shape[0] // ranks
    losses = []
    for rank in range(ranks):
        own = slice(rank * rows, (rank + 1) * rows)
        targets = torch.arange(rows) + rank * rows
        losses.append((F.cross_entropy(image[own] @ text_all.T / temperature, targets, label_smoothing=label_smoothing)
                       + F.cross_entropy(text[own] @ image_all.T / temperature, targets,
                                         label_smoothing=label_smoothing)) / 2)
    return torch.stack(losses).mean()


@pytest.mark.torch
@pytest.mark.parametrize("gradient", ["global", "lavis"])
def test_itc_is_the_references_cross_entropy_both_ways_with_label_smoothing(gradient):
    """Value and gradients (features before normalisation, temperature) of our loss are
    those of SEED's statement of it over the same (global) batch: on one process
    ("global"), and as SEED trained, over 4 ranks with the gathered features detached
    ("lavis": the feature gradients then differ from the global loss's)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    image, text = (rng.normal(size=(8, 16)).astype(np.float32) for _ in range(2))
    temperature = np.float32(0.07)

    def ours(image, text, temperature):
        return contrastive_loss(l2_normalize(image), l2_normalize(text), temperature, 0.1, gradient)[0]

    loss, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(image, text, temperature)
    inputs = [torch.tensor(x, requires_grad=True) for x in (image, text, temperature)]
    reference = (_reference_itc(*inputs, label_smoothing=0.1) if gradient == "global"
                 else _lavis_distributed_itc(*inputs, label_smoothing=0.1, ranks=4))
    reference.backward()
    np.testing.assert_allclose(float(loss), reference.item(), rtol=1e-5)
    for name, ours_grad, x in zip(("image", "text", "temperature"), grads, inputs):
        np.testing.assert_allclose(np.asarray(ours_grad), x.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    if gradient == "lavis":  # the option changes the feature gradients, not the temperature's
        other = jax.grad(lambda i: contrastive_loss(l2_normalize(i), l2_normalize(text), temperature, 0.1)[0])(image)
        assert np.abs(np.asarray(other) - np.asarray(grads[0])).max() > 1e-3


def test_the_image_feature_reads_the_last_causal_query_alone():
    """SEED's stage I contrasts the last causal query (the one that has seen all others)
    with the text: the other 31 query outputs do not change the image feature."""
    tok = SeedTokenizer(TINY_TOKENIZER, rngs=nnx.Rngs(0))
    causal = jax.random.normal(jax.random.key(1), (2, 32, 32))
    noise = jax.random.normal(jax.random.key(2), causal.shape)
    features = tok.image_features(causal)
    np.testing.assert_array_equal(tok.image_features(causal.at[:, :-1].add(noise[:, :-1])), features)
    assert np.abs(tok.image_features(causal.at[:, -1].add(noise[:, -1])) - features).max() > 1e-2
    np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, rtol=1e-5)
