"""The head's weight-gradient accumulation asks for the fused ``addmm(out_dtype=float32)`` only where this torch
has it (probed once per device type), and otherwise takes the two-step form with the same result."""

from __future__ import annotations

import torch

from pipeline.train import head


def test_fused_request_falls_back_where_addmm_has_no_out_dtype(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    g_n_V = torch.randn(7, 50, generator=gen).to(torch.bfloat16)
    h_n_H = torch.randn(7, 16, generator=gen).to(torch.bfloat16)
    reference = (g_n_V.double().T @ h_n_H.double()).float()
    supported = head.fused_addmm_supported(torch.device("cpu"))
    assert head.fused_addmm_supported(torch.device("cpu")) is supported  # one probe per device type, then cached
    monkeypatch.setitem(head._FUSED_ADDMM, "cpu", False)  # as on a torch without the keyword
    grad_V_H = torch.zeros(50, 16)
    head.accumulate_weight_grad(grad_V_H, g_n_V, h_n_H, fused=True)
    two_step = torch.zeros(50, 16)
    head.accumulate_weight_grad(two_step, g_n_V, h_n_H, fused=False)
    assert torch.equal(grad_V_H, two_step)
    torch.testing.assert_close(grad_V_H, reference, atol=0.1, rtol=0.02)  # a bf16 product of 7 terms


def test_probe_reads_a_missing_keyword_as_unsupported(monkeypatch):
    real = torch.addmm

    def old_addmm(*args, **kwargs):  # the signature of a torch release before out_dtype
        if "out_dtype" in kwargs:
            raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
        return real(*args, **kwargs)

    monkeypatch.setattr(head, "_FUSED_ADDMM", {})
    monkeypatch.setattr(torch, "addmm", old_addmm)
    assert head.fused_addmm_supported(torch.device("cpu")) is False
