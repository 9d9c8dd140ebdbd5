from twisted.application.service import ServiceMaker

gitstratum_standalone = ServiceMaker(
    "GitStratum standalone",
    "gitstratum.standalone.tap",
    "Every GitStratum tier in one process: Git over smart HTTP, admin API, LMDB storage.",
    "gitstratum-standalone",
)
gitstratum_control = ServiceMaker(
    "GitStratum control",
    "gitstratum.control.tap",
    "A control-plane node: membership and rings on Raft.",
    "gitstratum-control",
)
