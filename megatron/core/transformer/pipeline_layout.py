"""Which transformer layers each pipeline stage (and virtual stage) holds, as Megatron-LM
assigns them."""

from typing import List, Optional

from megatron.core import ConfigError


def pipeline_layer_numbers(num_layers: int, pp_size: int, pp_rank: int,
                           vp_size: Optional[int] = None, vp_rank: int = 0,
                           first_stage_layers: Optional[int] = None,
                           last_stage_layers: Optional[int] = None) -> List[int]:
    """Global 1-based layer numbers of model chunk ``vp_rank`` on pipeline stage ``pp_rank``.

    Even split: stage r holds layers r*L/p+1 .. (r+1)*L/p. With ``vp_size`` virtual stages
    per rank, chunk k of rank r holds the (k*p + r)-th of p*v equal runs of layers
    (Megatron's interleaved assignment). ``first_stage_layers`` / ``last_stage_layers`` give
    the first / last stage that many layers and split the rest evenly over the others.
    """
    check_pipeline_layout(num_layers, pp_size, vp_size, first_stage_layers, last_stage_layers)
    if first_stage_layers is None and last_stage_layers is None:
        chunks = pp_size * (vp_size or 1)
        per_chunk = num_layers // chunks
        run = (vp_rank * pp_size + pp_rank) if vp_size else pp_rank
        return list(range(run * per_chunk + 1, (run + 1) * per_chunk + 1))
    counts = _uneven_counts(num_layers, pp_size, first_stage_layers, last_stage_layers)
    start = sum(counts[:pp_rank])
    return list(range(start + 1, start + counts[pp_rank] + 1))


def _uneven_counts(num_layers, pp_size, first, last) -> List[int]:
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def check_pipeline_layout(num_layers: int, pp_size: int, vp_size: Optional[int] = None,
                          first_stage_layers: Optional[int] = None,
                          last_stage_layers: Optional[int] = None) -> None:
    """Raise ConfigError (naming the values) for a layout the layers cannot fill."""
    if pp_size == 1:
        if vp_size or first_stage_layers is not None or last_stage_layers is not None:
            raise ConfigError("virtual or uneven pipeline stages need "
                              "pipeline_model_parallel_size > 1.")
        return
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if uneven:
        if vp_size:
            raise ConfigError("decoder_first_pipeline_num_layers / "
                              "decoder_last_pipeline_num_layers cannot be combined with "
                              "virtual pipeline stages.")
        for name, value in (("decoder_first_pipeline_num_layers", first_stage_layers),
                            ("decoder_last_pipeline_num_layers", last_stage_layers)):
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be at least 1.")
        middle_stages = pp_size - (first_stage_layers is not None) - \
            (last_stage_layers is not None)
        middle_layers = num_layers - (first_stage_layers or 0) - (last_stage_layers or 0)
        if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0) or (
                middle_stages and (middle_layers % middle_stages or middle_layers == 0)):
            raise ConfigError(
                f"num_layers={num_layers} minus decoder_first_pipeline_num_layers="
                f"{first_stage_layers} and decoder_last_pipeline_num_layers="
                f"{last_stage_layers} leaves {middle_layers} layers, which the "
                f"{middle_stages} other stages cannot share evenly (at least one each).")
        return
    chunks = pp_size * (vp_size or 1)
    if num_layers % chunks:
        what = f"pipeline_model_parallel_size={pp_size}" + \
            (f" x {vp_size} virtual stages" if vp_size else "")
        raise ConfigError(f"num_layers={num_layers} is not divisible by {what}; every "
                          "pipeline stage must hold the same number of layers (or set "
                          "decoder_first_pipeline_num_layers / "
                          "decoder_last_pipeline_num_layers).")
