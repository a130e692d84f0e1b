"""One named logger per subsystem; handlers are configured only by the CLI."""

import logging

daemon_logger = logging.getLogger("netprofd")
store_logger = logging.getLogger("netprofd.store")
api_logger = logging.getLogger("netprofd.api")
control_logger = logging.getLogger("netprofd.control")
alert_logger = logging.getLogger("netprofd.alerts")
notify_logger = logging.getLogger("netprofd.delivery")
