"""Finding saved variants: report order, duplicates refused, a killed stage's leftovers ignored."""

import pytest

from lowbit.errors import LowbitError
from lowbit.formats import discover
from lowbit.variants import write_card


def test_discover_orders_variants_and_skips_a_killed_stages_temporary_output(tmp_path):
    for folder, variant in [("qat", "qat_int8"), ("ptq/ptq_nf4", "ptq_nf4"), ("baseline", "fp32"),
                            ("ptq/ptq_int4_weight_only", "ptq_int4_weight_only"),
                            (".ptq.tmp-abc/ptq_nf4", "ptq_nf4")]:  # what SIGKILL leaves mid-write
        (tmp_path / folder).mkdir(parents=True)
        write_card(tmp_path / folder, variant, "hf", "ptq")
    found = discover(tmp_path)
    assert list(found) == ["fp32", "ptq_int4_weight_only", "ptq_nf4", "qat_int8"]
    assert found["ptq_nf4"] == tmp_path / "ptq" / "ptq_nf4"
    (tmp_path / "lora").mkdir()
    write_card(tmp_path / "lora", "qat_int8", "hf", "lora")
    with pytest.raises(LowbitError, match="variant 'qat_int8' is produced twice"):
        discover(tmp_path)
