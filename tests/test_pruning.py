import pytest
import torch

from fedglm.clients.state import HeldModel
from fedglm.clients.sync import prune_held, receive_model
from fedglm.compression import model_hash
from fedglm.config import ModelConfig, PruneStep, PruningConfig
from fedglm.model import GLM, GLMArgs, build_model, count_parameters
from fedglm.payload import expected_shapes
from fedglm.pruning import Mask, choose_mask, importance, slice_model, slice_state, zero_pruned
from fedglm.server.broadcast import Broadcast
from fedglm.server.global_model import GlobalModel

ARGS = GLMArgs(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)


def trained_like(seed: int = 0) -> GLM:
    """A model whose weights differ in scale between heads and channels, as trained ones do."""
    model = build_model(ARGS, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param.mul_(torch.rand(param.shape[0], 1, generator=generator) * 2)
    return model


def test_the_sliced_model_gives_the_masked_models_logits() -> None:
    model = trained_like()
    mask = choose_mask(dict(model.state_dict()), ARGS, Mask.full(ARGS), heads=0.5, channels=0.5)
    sliced = slice_model(model, ARGS, Mask.full(ARGS), mask)
    zero_pruned(model, mask)
    tokens = torch.randint(0, 258, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sliced(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    assert count_parameters(sliced) < count_parameters(model)
    assert sliced.args.layer_heads == (2, 2) and sliced.args.layer_ff == (24, 24)


def test_slicing_in_two_steps_equals_slicing_at_once() -> None:
    state = dict(trained_like().state_dict())
    full = Mask.full(ARGS)
    first = choose_mask(state, ARGS, full, heads=0.25, channels=0.25)
    once_sliced = slice_state(state, ARGS, full, first)
    second = choose_mask(once_sliced, ARGS, first, heads=0.5, channels=0.5)
    assert second.within(first) and first.within(full)
    twice = slice_state(once_sliced, ARGS, first, second)
    direct = slice_state(state, ARGS, full, second)
    assert all(torch.equal(twice[name], direct[name]) for name in direct)


def test_the_most_important_heads_and_channels_are_kept() -> None:
    state = dict(build_model(ARGS, 0).state_dict())
    with torch.no_grad():
        state["blocks.0.attn.v_proj.weight"][8:16] *= 10.0  # head 1
        state["blocks.0.mlp.up_proj.weight"][5] *= 10.0
    heads, channels = importance(state, ARGS)
    assert int(heads[0].argmax()) == 1 and int(channels[0].argmax()) == 5
    mask = choose_mask(state, ARGS, Mask.full(ARGS), heads=0.75, channels=0.9)
    assert mask.heads[0] == (1,)
    assert 5 in mask.channels[0] and len(mask.channels[0]) == 5  # round(48 * 0.1)


def test_at_least_one_head_and_channel_stay_and_masks_only_shrink() -> None:
    state = dict(build_model(ARGS, 0).state_dict())
    mask = choose_mask(state, ARGS, Mask.full(ARGS), heads=0.99, channels=0.99)
    assert mask.kept() == (2, 2)
    with pytest.raises(ValueError, match="only remove"):
        slice_state(slice_state(state, ARGS, Mask.full(ARGS), mask), ARGS, mask, Mask.full(ARGS))


def test_mask_json_round_trips_and_bad_masks_are_refused() -> None:
    mask = Mask(heads=((0, 3), (1,)), channels=(tuple(range(0, 48, 2)), (47,)))
    assert Mask.from_json(mask.to_json(), ARGS) == mask
    for bad in (
        "not json",
        '{"heads": [], "channels": []}',
        '{"heads": ["1f","1"], "channels": ["1","1"]}',
        '{"heads": ["0","1"], "channels": ["1","1"]}',
        '{"heads": ["x","1"], "channels": ["1","1"]}',
    ):
        with pytest.raises(ValueError, match="pruning mask"):
            Mask.from_json(bad, ARGS)


def test_schedule_must_only_remove() -> None:
    with pytest.raises(ValueError, match="below"):
        PruningConfig(schedule=[PruneStep(round=2, heads=0.5), PruneStep(round=3, heads=0.25)])
    with pytest.raises(ValueError, match="increase"):
        PruningConfig(schedule=[PruneStep(round=3), PruneStep(round=2)])


def test_server_and_site_slice_to_the_same_model() -> None:
    """The coordinator prunes at the scheduled round; a site that held the model before slices
    its copy to the sent mask and holds exactly the coordinator's model, with no payload bytes."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)
    args = cfg.glm_args()
    state = dict(trained_like().state_dict())
    broadcast = Broadcast(state)
    broadcast.holds(7)
    model = GlobalModel(
        broadcast,
        model_args=args,
        pruning=PruningConfig(schedule=[PruneStep(round=2, heads=0.5, channels=0.25)]),
    )
    assert not model.prune(1)
    assert model.mask_json == ""
    assert model.prune(2)
    assert model.mask is not None and model.mask.kept() == (4, 72)
    site = HeldModel("run", model_hash(state), state)
    pruned = prune_held(site, model.mask_json, cfg)
    assert pruned is not None and pruned.hash == broadcast.hash
    shapes = expected_shapes(GLM(model.mask.shape(args)))
    assert shapes == broadcast.shapes
    blob = broadcast.payload_for(7, 2)
    got = receive_model(blob, held=pruned, run="run", model_cfg=cfg, shapes=shapes, mask_text=model.mask_json)
    assert got is pruned
