from twisted.application.service import ServiceMaker

gitstratum_standalone = ServiceMaker(
    "GitStratum standalone",
    "gitstratum.standalone.tap",
    "Every GitStratum tier in one process: Git over smart HTTP, admin API, LMDB storage.",
    "gitstratum-standalone",
)
