"""Experiment loggers with what Lightning's own leave out. ``configs/logger/`` selects them.

* :class:`TensorBoardLogger`: Lightning's, plus TensorBoard's HParams tab: the run's config next to
  its validation metrics (best and latest), so that the runs of a sweep can be compared in one table.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# The metrics of the HParams table: every validation metric (val/psnr, val/psnr_best, val/<set>/psnr,
# val/<set>/ssim).
HPARAMS_METRIC_PREFIX = "val/"


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger that also fills TensorBoard's HParams tab.

    The HParams plugin reads three records from a run: the *experiment* (which hyperparameters and
    which metric tags exist), the *session start* (this run's hyperparameter values) and the
    *session end* (its status). A metric's value in the table is the latest value of the scalar
    with that tag, so the table shows the best PSNR so far (``val/psnr_best``) and the latest
    per-set PSNR/SSIM without logging anything twice.

    Lightning writes these records only when ``log_hyperparams`` is given metrics: with
    ``default_hp_metric=True`` it logs a placeholder ``hp_metric = -1``, with ``False`` (this
    project's setting, which keeps the placeholder out of the scalars) it writes none and the tab
    stays empty. Here the experiment and session start are written when the first validation
    metrics are logged (then the metric tags, which include the validation set names, are known;
    a run killed later still appears in the table), and the session end when the run ends
    (``finalize``: success, failure, or aborted by a signal). TensorBoard keeps the first record
    of each kind in a run, so each is written once.
    """

    def __init__(self, *args: Any, default_hp_metric: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, default_hp_metric=default_hp_metric, **kwargs)
        self._hparams_tags: list[str] = []
        self._hparams_written = False
        self._session_ended = False

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        new_tags = [tag for tag in metrics if tag.startswith(HPARAMS_METRIC_PREFIX) and tag not in self._hparams_tags]
        self._hparams_tags.extend(new_tags)
        if new_tags and not self._hparams_written:
            self._write_hparams_session()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self._hparams_written:
            self._write_hparams_session()
        if self._hparams_written and not self._session_ended:
            self._write_session_end(status)
        super().finalize(status)

    def _write_hparams_session(self) -> None:
        """The experiment (hyperparameter names, metric tags) and this run's hyperparameter values."""
        if not self.hparams:  # nothing to show: log_hyperparams was never called
            return
        from torch.utils.tensorboard.summary import hparams

        params = self._sanitize_params(_flatten_dict(_convert_params(dict(self.hparams))))
        metric_tags = sorted(self._hparams_tags) or ["val/psnr_best"]
        experiment, session_start, _ = hparams(params, dict.fromkeys(metric_tags, 0.0))
        writer = self.experiment._get_file_writer()
        writer.add_summary(experiment)
        writer.add_summary(session_start)
        self._hparams_written = True

    def _write_session_end(self, status: str) -> None:
        """Lightning's finalize status ("success", "failed", "finished" after a signal) as the HParams status."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        hparams_status = {"success": "STATUS_SUCCESS", "failed": "STATUS_FAILURE"}.get(status, "STATUS_ABORTED")
        content = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(hparams_status),
                                                            end_time_secs=time.time()),
        )
        summary_metadata = metadata.create_summary_metadata(content)
        self.experiment._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=summary_metadata)])
        )
        self._session_ended = True
