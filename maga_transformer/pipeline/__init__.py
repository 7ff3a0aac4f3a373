from maga_transformer.pipeline.pipeline import Pipeline, PipelineResponse

__all__ = ["Pipeline", "PipelineResponse"]
