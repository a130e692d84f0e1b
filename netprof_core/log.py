"""One named logger per subsystem; handlers are configured only by the CLIs."""

import logging

logger = logging.getLogger("netprof")
recorder_logger = logging.getLogger("netprof.recorder")
segment_logger = logging.getLogger("netprof.segment")
