from metac.core.service import run_service
from metac.fs.service import FsService

run_service(FsService)
