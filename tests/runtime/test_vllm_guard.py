"""Prompt embeddings are checked before they reach vLLM: each bad case is refused with its reason."""

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter
from lamp_runtime.errors import AdapterError, RequestError
from lamp_runtime.prompts.prepared import PreparedPrompt, assemble_embeddings, prepare
from lamp_runtime.vllm.guard import check_prepared_prompt, check_prompt_embeds

HIDDEN = 8


def check(embeds, max_model_len=32, max_new_tokens=4, dtype=torch.float32):
    check_prompt_embeds(embeds, hidden_size=HIDDEN, dtype=dtype, max_model_len=max_model_len,
                        max_new_tokens=max_new_tokens, task_id="t")


def test_well_formed_embeddings_pass():
    check(torch.zeros(5, HIDDEN))


@pytest.mark.parametrize("shape", [(5, HIDDEN + 1), (5,), (1, 5, HIDDEN)])
def test_wrong_shape_is_an_adapter_error_naming_the_shape(shape):
    with pytest.raises(AdapterError, match=r"task 't'.*shape .*needs \[tokens, 8\]"):
        check(torch.zeros(shape))


def test_non_finite_values_are_refused():
    embeds = torch.zeros(5, HIDDEN)
    embeds[3, 2] = float("nan")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        check(embeds)
    embeds[3, 2] = float("inf")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        check(embeds)


def test_too_long_for_max_model_len_is_a_request_error():
    with pytest.raises(RequestError, match="29 tokens.*max_new_tokens \\(4\\).*max_model_len of 32"):
        check(torch.zeros(29, HIDDEN))
    check(torch.zeros(28, HIDDEN))


def test_empty_wrong_dtype_and_non_tensor_are_refused():
    with pytest.raises(RequestError, match="empty"):
        check(torch.zeros(0, HIDDEN))
    with pytest.raises(TypeError, match="bfloat16"):
        check(torch.zeros(5, HIDDEN, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        check([[0.0] * HIDDEN])


def test_assembly_prepends_prompt_and_offsets_only_the_first_inputs():
    g = torch.Generator().manual_seed(0)
    ept = EptAdapter(AdapterMeta(), torch.randn(3, HIDDEN, generator=g), torch.randn(4, 2, generator=g),
                     torch.randn(2, HIDDEN, generator=g))
    prepared = prepare(ept)
    inputs = torch.randn(6, HIDDEN, generator=g)
    out = assemble_embeddings(prepared, inputs)
    assert out.shape == (3 + 6, HIDDEN)
    assert torch.equal(out[:3], prepared.prompt)
    assert torch.allclose(out[3:7], inputs[:4] + ept.a @ ept.b)
    assert torch.equal(out[7:], inputs[4:])
    short = assemble_embeddings(prepared, inputs[:2])  # shorter than the offset: only 2 rows shift
    assert torch.allclose(short[3:], inputs[:2] + (ept.a @ ept.b)[:2])
    assert torch.equal(assemble_embeddings(None, inputs), inputs)
    assert torch.equal(assemble_embeddings(PreparedPrompt(prepared.prompt), inputs[:0]), prepared.prompt)


def test_a_prepared_prompt_of_the_wrong_width_is_refused_before_assembly():
    check_prepared_prompt(PreparedPrompt(torch.zeros(3, HIDDEN), torch.zeros(2, HIDDEN)), hidden_size=HIDDEN,
                          task_id="t")
    with pytest.raises(AdapterError, match=r"task 't': its prompt has shape \(3, 9\)"):
        check_prepared_prompt(PreparedPrompt(torch.zeros(3, HIDDEN + 1)), hidden_size=HIDDEN, task_id="t")
    with pytest.raises(AdapterError, match=r"its EPT offset has shape \(2, 7\)"):
        check_prepared_prompt(PreparedPrompt(torch.zeros(3, HIDDEN), torch.zeros(2, HIDDEN - 1)),
                              hidden_size=HIDDEN, task_id="t")
