"""Parallel layout: how a world of ranks is split into TP/PP/CP/EP/DP groups, and the one mapping of
that layout to Megatron-Core's arguments (`parallel_state.initialize_model_parallel` and the
parallel fields of `TransformerConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Megatron-Core's layout. The dense part uses world = tp * cp * pp * dp; the expert part uses
    world = etp * ep * pp * edp (expert data parallel), so EP folds into DP x CP x TP of the dense part.
    """

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    etp: int = 1  # expert tensor parallel
    sequence_parallel: bool | None = None  # None: on exactly when tp > 1
    # Megatron-Core pipeline layout string ("E" embedding, "t" decoder layer, "m" MTP, "L" loss,
    # "|" stage boundary), e.g. "Ett|(ttt|)*14,tmmmL" for 45 layers + MTP-3 on PP8 x VPP2. Lets a
    # layer count that does not divide pp*vpp be split unevenly. None: uniform split.
    pipeline_layout: str | None = None
    world_size: int | None = None  # None: taken from torch.distributed at setup

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.cp > 1:  # Megatron-Core would accept it, and the run would silently train something else
            raise ValueError(
                f"parallel.cp={self.cp}: context parallelism is not built here (no batch is split per CP "
                "rank and the local attention has no CP path); use parallel.cp=1"
            )
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                raise ValueError(f"parallel.vpp must be None or a positive integer, got {self.vpp!r}")
            if self.vpp > 1 and self.pp < 2:
                raise ValueError(f"parallel.vpp={self.vpp} needs pp >= 2, got pp={self.pp}")
        if self.pipeline_layout is not None:
            stages = self.pipeline_layout_stages()
            if stages % self.pp:
                raise ValueError(
                    f"parallel.pipeline_layout has {stages} stages, not a multiple of pp={self.pp}"
                )
            implied = stages // self.pp
            if self.vpp is None and implied > 1:
                self.vpp = implied
            elif (self.vpp or 1) != implied:
                raise ValueError(
                    f"parallel.vpp={self.vpp} but pipeline_layout has {stages} stages "
                    f"= pp({self.pp}) x {implied}"
                )
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1
        elif self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=True needs tp > 1 (got tp=1)")
        if self.world_size is not None:
            self.validate(self.world_size)

    def initialize_kwargs(self) -> dict:
        """Keyword arguments of `parallel_state.initialize_model_parallel` (platform.setup)."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
        )

    def transformer_kwargs(self) -> dict:
        """The parallel fields of a Megatron-Core `TransformerConfig` (every model builder): the same
        group sizes as `initialize_kwargs`, sequence parallelism and the pipeline layout."""
        return dict(
            **self.initialize_kwargs(),
            sequence_parallel=bool(self.sequence_parallel),
            pipeline_model_parallel_layout=self.pipeline_layout,
            # the interleaved schedule sends activations forward and gradients backward in one call;
            # with pp = 2 both go to the same peer, and batched (batch_isend_irecv) they pair by posting
            # order -- a gradient lands in the activation buffer (measured: wrong log-probs from the
            # third microbatch on). Unbatched, Megatron-Core sends one direction on another
            # communicator (as Megatron-LM runs VPP: overlap on, batching off).
            batch_p2p_comm=not (self.vpp and self.vpp > 1),
        )

    def pipeline_layout_stages(self) -> int:
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        try:
            return PipelineParallelLayerLayout.get_num_stages_from_str(self.pipeline_layout)
        except AssertionError as e:
            raise ValueError(f"parallel.pipeline_layout={self.pipeline_layout!r}: {e}") from None

    def validate_layers(self, num_layers: int, mtp_num_layers: int) -> None:
        """Raise with the numbers when the decoder (+ MTP) cannot be split over the pipeline."""
        if self.pipeline_layout is not None:
            from megatron.core.transformer.pipeline_parallel_layer_layout import (
                PipelineParallelLayerLayout,
            )

            try:
                PipelineParallelLayerLayout(self.pipeline_layout, self.pp).validate_layer_layout(
                    num_layers, mtp_num_layers or None
                )
            except AssertionError as e:
                raise ValueError(f"parallel.pipeline_layout={self.pipeline_layout!r}: {e}") from None
            return
        stages = self.pp * (self.vpp or 1)
        if num_layers % stages:
            raise ValueError(
                f"num_layers({num_layers}) is not divisible by pp({self.pp}) * vpp({self.vpp or 1}) = "
                f"{stages}; change the layout or give parallel.pipeline_layout for an uneven split"
            )

    def validate(self, world_size: int) -> None:
        """Raise with the numbers when this layout does not fit `world_size` ranks."""
        dense = self.tp * self.pp * self.cp
        if world_size % dense:
            raise ValueError(
                f"tp({self.tp}) * pp({self.pp}) * cp({self.cp}) = {dense} does not divide "
                f"world size {world_size}"
            )
        expert = self.etp * self.ep * self.pp
        if world_size % expert:
            raise ValueError(
                f"etp({self.etp}) * ep({self.ep}) * pp({self.pp}) = {expert} does not divide "
                f"world size {world_size}"
            )

    def dp(self, world_size: int | None = None) -> int:
        """Data-parallel size of the dense part."""
        ws = world_size or self.world_size
        if ws is None:
            raise ValueError("world size unknown: pass world_size or set ParallelConfig.world_size")
        self.validate(ws)
        return ws // (self.tp * self.pp * self.cp)

    def expert_dp(self, world_size: int | None = None) -> int:
        ws = world_size or self.world_size
        if ws is None:
            raise ValueError("world size unknown: pass world_size or set ParallelConfig.world_size")
        self.validate(ws)
        return ws // (self.etp * self.ep * self.pp)

    def describe(self, world_size: int) -> str:
        return (
            f"world={world_size} tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} "
            f"dp={self.dp(world_size)} ep={self.ep} etp={self.etp} "
            f"edp={self.expert_dp(world_size)} sp={self.sequence_parallel}"
        )
