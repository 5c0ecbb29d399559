"""Fine-tuning surfaces: P-Tuning v2 prefixes (spec §3.4), the classification head and LoRA through peft."""

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.cache_utils import DynamicCache

from tiny_checkpoint import random_model

VOCAB = 160
PRE_SEQ_LEN = 4


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    random_model(folder, VOCAB, add_qkv_bias=True).save_pretrained(folder)
    return folder


def ids_of(batch=2, length=7, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def ptuning_model(base_folder, projection):
    model = AutoModel.from_pretrained(
        base_folder, trust_remote_code=True, pre_seq_len=PRE_SEQ_LEN, prefix_projection=projection
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.transformer.prefix_encoder.parameters():
            parameter.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_encoder_parameters_follow_the_published_names(base_folder, projection):
    model = ptuning_model(base_folder, projection)
    config = model.config
    kv_size = config.num_layers * 2 * config.multi_query_group_num * config.kv_channels
    names = {k: tuple(v.shape) for k, v in model.state_dict().items() if "prefix_encoder" in k}
    expected = {"transformer.prefix_encoder.embedding.weight": (PRE_SEQ_LEN, kv_size)}
    if projection:
        expected |= {
            "transformer.prefix_encoder.trans.0.weight": (config.hidden_size, kv_size),
            "transformer.prefix_encoder.trans.0.bias": (config.hidden_size,),
            "transformer.prefix_encoder.trans.2.weight": (kv_size, config.hidden_size),
            "transformer.prefix_encoder.trans.2.bias": (kv_size,),
        }
    assert names == expected


def test_only_the_prefix_encoder_trains(base_folder):
    model = ptuning_model(base_folder, projection=False).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight"}
    ids = ids_of()
    model(ids, labels=ids).loss.backward()
    assert model.transformer.prefix_encoder.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_with_gradient_checkpointing_trains_the_prefix(base_folder, projection):
    model = ptuning_model(base_folder, projection).train()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = ids_of(batch=2, length=7)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        gradient = model.transformer.prefix_encoder.embedding.weight.grad
        assert gradient is not None and gradient.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_trainer_evaluate_and_predict_leave_the_cache_out(base_folder, tmp_path):
    """keys_to_ignore_at_inference must name the output field this transformers puts the cache in
    (past_key_values on 4.57, cache on 5.x), or Trainer tries to gather the cache as predictions."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            ids = ids_of(batch=1, length=7, seed=index)[0]
            return {"input_ids": ids, "labels": ids}

    model = AutoModel.from_pretrained(base_folder, trust_remote_code=True)
    outputs = model(ids_of(batch=1), use_cache=True)
    cache_keys = [key for key, value in outputs.items() if isinstance(value, DynamicCache)]
    assert cache_keys and set(cache_keys) <= set(model.config.keys_to_ignore_at_inference)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=model, args=arguments, eval_dataset=Rows())
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    prediction = trainer.predict(Rows())
    assert prediction.predictions.shape == (4, 7, model.config.padded_vocab_size)


def test_prefix_acts_as_key_values_in_front_of_every_layer(base_folder):
    model = ptuning_model(base_folder, projection=True).eval()
    base = AutoModel.from_pretrained(base_folder, trust_remote_code=True).eval()
    ids = ids_of(batch=1)
    config = model.config
    with torch.no_grad():
        prefix = model.transformer.prefix_encoder(torch.arange(PRE_SEQ_LEN)[None])
        prefix = prefix.view(1, PRE_SEQ_LEN, config.num_layers * 2, config.multi_query_group_num, config.kv_channels)
        prefix = prefix.permute(2, 0, 3, 1, 4)
        cache = DynamicCache()
        for layer in range(config.num_layers):
            cache.update(prefix[2 * layer], prefix[2 * layer + 1], layer)
        expected = base(
            ids,
            past_key_values=cache,
            attention_mask=torch.ones(1, PRE_SEQ_LEN + ids.shape[1], dtype=torch.long),
            position_ids=torch.arange(ids.shape[1])[None],
        ).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_prefix_only_checkpoint_loads_on_top_of_base_weights(base_folder, tmp_path):
    trained = ptuning_model(base_folder, projection=False).eval()
    prefix_state = {k: v for k, v in trained.state_dict().items() if k.startswith("transformer.prefix_encoder.")}
    torch.save(prefix_state, tmp_path / "pytorch_model.bin")

    fresh, info = AutoModel.from_pretrained(
        base_folder, trust_remote_code=True, pre_seq_len=PRE_SEQ_LEN, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"transformer.prefix_encoder.embedding.weight"}
    loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    fresh.transformer.prefix_encoder.load_state_dict(
        {k.removeprefix("transformer.prefix_encoder."): v for k, v in loaded.items()}
    )
    ids = ids_of()
    torch.testing.assert_close(fresh.eval()(ids).logits, trained(ids).logits)


def test_prefix_model_generates_padded_batches_like_single_prompts(base_folder):
    model = ptuning_model(base_folder, projection=False).eval()
    short, long = ids_of(batch=1, length=4, seed=2), ids_of(batch=1, length=7, seed=3)
    ids = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(batched[0, 3:], model.generate(short, max_new_tokens=4, do_sample=False)[0])
    assert torch.equal(batched[1], model.generate(long, max_new_tokens=4, do_sample=False)[0])


def classifier(base_folder, **kwargs):
    model = AutoModelForSequenceClassification.from_pretrained(base_folder, trust_remote_code=True, **kwargs)
    return model.eval()


def test_classification_pools_the_last_real_token_for_either_padding_side(base_folder):
    model = classifier(base_folder, num_labels=3)
    ids = ids_of(batch=1, length=5)
    alone = model(ids).logits
    assert alone.shape == (1, 3)
    pad = torch.zeros(1, 2, dtype=torch.long)
    left = model(torch.cat((pad, ids), 1), attention_mask=torch.cat((pad, torch.ones_like(ids)), 1)).logits
    right = model(
        torch.cat((ids, pad), 1),
        attention_mask=torch.cat((torch.ones_like(ids), pad), 1),
        position_ids=torch.cat((torch.arange(5), torch.zeros(2, dtype=torch.long)))[None],
    ).logits
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "problem_type,num_labels,labels,loss_fn",
    [
        ("regression", 1, torch.tensor([0.5, -1.0]), lambda logits, y: torch.nn.functional.mse_loss(logits[:, 0], y)),
        (
            "single_label_classification",
            3,
            torch.tensor([2, 0]),
            lambda logits, y: torch.nn.functional.cross_entropy(logits, y),
        ),
        (
            "multi_label_classification",
            3,
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(logits, y),
        ),
    ],
)
def test_classification_losses_by_problem_type(base_folder, problem_type, num_labels, labels, loss_fn):
    model = classifier(base_folder, num_labels=num_labels, problem_type=problem_type)
    out = model(ids_of(), labels=labels)
    torch.testing.assert_close(out.loss, loss_fn(out.logits, labels))


def test_classification_tuple_output_puts_the_loss_first(base_folder):
    model = classifier(base_folder, num_labels=3)
    labels = torch.tensor([2, 0])
    out = model(ids_of(), labels=labels)
    loss, logits, cache = model(ids_of(), labels=labels, return_dict=False)
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    assert cache.get_seq_length() == ids_of().shape[1]
    assert len(model(ids_of(), use_cache=False, return_dict=False)) == 1


def test_lora_on_query_key_value_trains_and_merges_back_to_released_names(base_folder):
    peft = pytest.importorskip("peft")
    model = AutoModel.from_pretrained(base_folder, trust_remote_code=True)
    base_names = set(model.state_dict())
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], lora_dropout=0.0)
    )
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "query_key_value" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = ids_of(batch=2, length=8)
    losses = []
    lora.train()
    for _ in range(8):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
    merged = lora.merge_and_unload()
    assert set(merged.state_dict()) == base_names
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
