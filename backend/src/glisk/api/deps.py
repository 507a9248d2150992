"""FastAPI dependencies. Handlers declare ``uow: UowDep`` and get a request-scoped unit of work
that commits when the handler returns and rolls back if it raises."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from glisk.uow import UnitOfWork, UnitOfWorkFactory


def get_uow_factory(request: Request) -> UnitOfWorkFactory:
    return request.app.state.uow_factory


async def get_uow(
    uow_factory: Annotated[UnitOfWorkFactory, Depends(get_uow_factory)],
) -> AsyncIterator[UnitOfWork]:
    async with uow_factory() as uow:
        yield uow


# scope="function": the commit happens before the response is sent, so a failed commit
# becomes an error response instead of a 200 for work that was lost.
UowDep = Annotated[UnitOfWork, Depends(get_uow, scope="function")]
